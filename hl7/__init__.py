"""HL7 v2 over MLLP: framing, ER7 tokenizer, ACKs, mapping ORU/ADT to records."""
