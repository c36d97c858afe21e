"""Rules every part of the cell shares; imports no part (admin_server, model_server, ...)."""
