"""Resolve the JVM pieces (Delta, Spark's Kafka and Avro connectors, the Kafka broker) from
Maven Central with ``mvn`` into a project-local folder.

Each jar set is described by a pom in ``conf/jvm/``. A set is resolved again only when its pom
(or, for Spark, the installed pyspark) changes, so a second set-up takes well under a second.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lambda_ml.config import PROJECT_ROOT, PlatformConfig

log = logging.getLogger(__name__)

POM_DIR = PROJECT_ROOT / "conf" / "jvm"
MAVEN_SETTINGS = POM_DIR / "maven-settings.xml"
_MARKER = ".resolved"
_VERSION_SUFFIX = re.compile(r"-\d[^_]*\.jar$")  # versions never contain "_"


class SetupError(RuntimeError):
    """A set-up prerequisite is missing or Maven could not resolve a jar set."""


@dataclass(frozen=True)
class JarSet:
    name: str
    pom: Path
    # Drop jars whose artifact pyspark already ships (Spark, Scala, Jackson, Hadoop...).
    skip_pyspark_provided: bool


SPARK_JARS = JarSet("spark", POM_DIR / "spark-jars.pom.xml", skip_pyspark_provided=True)
KAFKA_BROKER = JarSet("kafka-broker", POM_DIR / "kafka-broker.pom.xml", skip_pyspark_provided=False)
JAR_SETS = (SPARK_JARS, KAFKA_BROKER)


def artifact_name(jar_file: str) -> str:
    """The artifact id of a jar file name, without its version.

    >>> artifact_name("delta-spark_4.2_2.13-4.4.0.jar")
    'delta-spark_4.2_2.13'
    >>> artifact_name("zstd-jni-1.5.7-3.jar")
    'zstd-jni'
    """
    return _VERSION_SUFFIX.sub("", jar_file)


def pyspark_jars_dir() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent / "jars"


def _fingerprint(jar_set: JarSet) -> str:
    digest = hashlib.sha256(jar_set.pom.read_bytes())
    if jar_set.skip_pyspark_provided:
        digest.update(" ".join(sorted(p.name for p in pyspark_jars_dir().glob("*.jar"))).encode())
    return digest.hexdigest()


def jar_dir(cfg: PlatformConfig, jar_set: JarSet) -> Path:
    return cfg.jvm_dir / jar_set.name


def require_tools() -> None:
    """Fail with a plain message when Java or Maven is missing."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        raise SetupError(
            f"{' and '.join(missing)} not found on PATH: install OpenJDK 17 and Maven "
            "(e.g. `apt-get install openjdk-17-jdk-headless maven`) and run set-up again"
        )


def resolve(cfg: PlatformConfig, jar_set: JarSet) -> list[Path]:
    """Resolve one jar set unless it is already resolved from the same pom; return its jars."""
    target = jar_dir(cfg, jar_set)
    fingerprint = _fingerprint(jar_set)
    marker = target / _MARKER
    if marker.exists() and marker.read_text().strip() == fingerprint:
        log.info("%s jars already resolved in %s", jar_set.name, target)
        return sorted(target.glob("*.jar"))
    require_tools()
    log.info("resolving %s jars from Maven Central (%s)", jar_set.name, jar_set.pom.name)
    with tempfile.TemporaryDirectory(prefix=f"{jar_set.name}-", dir=cfg.jvm_dir.parent) as tmp:
        command = [
            "mvn", "-B", "-q", "-s", str(MAVEN_SETTINGS), "-f", str(jar_set.pom),
            "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={tmp}",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            detail = "\n".join(line for line in done.stdout.splitlines() if "ERROR" in line)[:2000]
            raise SetupError(f"mvn could not resolve {jar_set.pom}:\n{detail or done.stderr[-2000:]}")
        provided = (
            {artifact_name(p.name) for p in pyspark_jars_dir().glob("*.jar")}
            if jar_set.skip_pyspark_provided
            else set()
        )
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for jar in sorted(Path(tmp).glob("*.jar")):
            if artifact_name(jar.name) not in provided:
                shutil.move(str(jar), target / jar.name)
    marker.write_text(fingerprint + "\n")
    jars = sorted(target.glob("*.jar"))
    log.info("%s: %d jars in %s", jar_set.name, len(jars), target)
    return jars


def resolve_all(cfg: PlatformConfig) -> dict[str, list[Path]]:
    cfg.jvm_dir.mkdir(parents=True, exist_ok=True)
    return {jar_set.name: resolve(cfg, jar_set) for jar_set in JAR_SETS}


def resolved_jars(cfg: PlatformConfig, jar_set: JarSet) -> list[Path]:
    """The jars of a set already resolved, or a plain error saying how to resolve them."""
    jars = sorted(jar_dir(cfg, jar_set).glob("*.jar"))
    if not jars or not (jar_dir(cfg, jar_set) / _MARKER).exists():
        raise SetupError(f"{jar_set.name} jars are missing in {jar_dir(cfg, jar_set)}: run `lambda-ml setup`")
    return jars
