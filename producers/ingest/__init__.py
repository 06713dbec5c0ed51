"""The ingest service (``dpe ingest``): validate, store, deduplicate and publish unlabeled images.

`service` (the `Ingestor`), `settings` (the ``ingest`` section), `cli` (the command), `sources`
(folders, manifests, the synthetic world, a watched folder), `paths` (confining untrusted
locations), `index` (content hashes already published).
"""
