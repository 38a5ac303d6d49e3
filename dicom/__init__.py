"""DICOM: SCP (echo, store, find), safe file store, metadata extraction. Comes with its issue.

pydicom decodes what modalities and query clients send. Its reading validation is off in every
process that imports this package: left on, it logs a warning (and raises a Python warning) for
each element it finds out of the standard, an IS value with the value itself, a line per
element per instance from a sloppy modality; and it costs time (the 23 values the index reads
took 0.40 ms with it, 0.35 ms without, on the benchmark machine). What the gateway keeps it
checks itself (`dicom.metadata`: UIDs, dates, numbers, lengths). Decoding does not change: text
that does not decode still gets replacement characters.
"""

from pydicom import config as _pydicom_config

_pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE
