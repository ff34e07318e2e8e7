"""query-service: DICOM matching (PS3.4 C.2.2.2) over the PostgreSQL index, over HTTP."""
