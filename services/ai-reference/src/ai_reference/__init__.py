"""A reference inference service: CT threshold segmentation answered as a DICOM Segmentation and a measurement SR."""
