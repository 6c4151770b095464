"""Signed model bundles: a directory holding a ``.tflite``, its ``manifest.json`` and ``model.sig``.

Everything up to "a verified, smoke-tested bundle sits in the staged slot" lives here, one concern per
module: the manifest (``manifest``) and its provenance from a training run (``provenance``), signatures
(``signing``), the car's trusted keys (``trust``), the A/B slots on disk (``store``), downloads
(``fetch``) and tar files (``archive``), the out-of-process smoke test (``smoke``), the pipeline that
chains them (``stage``) and the ``donkey-agent model`` commands (``commands``). Activation, shadow
trials and probation belong to the daemon, which uses these pieces. See docs/models.md.

Nothing here is imported by the drive core: the signing library and pydantic stay off its path.
"""
