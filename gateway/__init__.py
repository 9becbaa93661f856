"""deid-gateway: a DICOM de-identification gateway for digital pathology."""

__version__ = "0.1.0"
