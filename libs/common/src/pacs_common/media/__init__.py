"""DICOM media: File-sets with a DICOMDIR (PS3.10 / PS3.11 General Purpose
profile) exported from the archive, and file sets, folders and zips imported
through the normal ingest path."""
