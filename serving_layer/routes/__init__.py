"""The service's own routes, each module one ``APIRouter`` built for a :class:`ServiceContext`:
``features`` (``GET /features/{entity}/{key}``) and ``operations`` (``/models``, ``/health``,
``/ready``, ``/metrics``); ``docs`` serves ``/docs`` and ``/redoc`` from local files. The
application's routes come from its ``ServingModels.mount``."""
