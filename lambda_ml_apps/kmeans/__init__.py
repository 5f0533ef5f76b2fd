"""k-means clustering on the platform.

The batch layer trains the centres on the whole lake with Spark's k-means|| (:mod:`.batch`),
choosing k by silhouette; the speed layer moves them between batch runs with Sculley's
mini-batch updates and a forgetting factor (:func:`.model.mini_batch_update`); serving assigns
each point to its nearest centre (:func:`.model.assign`). The model travels as data
(:class:`.model.KMeansCentres`, a small JSON object). :mod:`.generator` makes point events whose
true centres move at a known speed; :mod:`.datasets` loads a real public data set shipped
with scikit-learn.
"""
