"""Sub-commands of the ``deid-gateway`` command line, one module each."""
