"""Rules every part of the cell shares (Saxml's `common/`): names and validation, override keys,
request bounds, the env-settings helper, the GCS client and the gunicorn serving helpers.

Every part imports this package; it imports no part (admin_server, model_server, ...).
"""
