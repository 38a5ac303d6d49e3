"""DICOM: SCP (echo, store, find), safe file store, metadata extraction. Comes with its issue."""
