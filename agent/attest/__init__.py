"""Keylime/IMA attestation, the device side and the token (docs/attestation.md).

The car cannot ask Keylime whether it is itself attested (the verifier's API needs the admin identity, which never
lives on a car), so the fleet turns the verifier's verdict into a short-lived signed token (``token.py``, issued by
``bridge.py``) and the car drives autonomously only while it holds a valid one (``gate.py``). The rest is read-only
inspection of this machine: the Keylime agent's settings (``keylime_conf.py``), the IMA log format (``imalog.py``),
self-checks (``selfcheck.py``) and the runtime-policy fragment for the fleet to merge (``policy.py``).

Nothing here is on the drive thread's import path, and nothing here writes to the TPM or to the IMA policy.
"""
