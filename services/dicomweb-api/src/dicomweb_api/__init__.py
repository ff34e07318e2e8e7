"""dicomweb-api: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) and the management REST API."""
