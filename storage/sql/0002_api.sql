-- Indexes behind the FHIR read API.
-- `identifier=VALUE` without a system looks identifiers up by value alone (the primary key
-- starts with the system), and a patient's merged records are found by `replaced_by`.
CREATE INDEX patient_identifier_value_idx ON patient_identifier (value);
CREATE INDEX patient_replaced_by_idx ON patient (replaced_by) WHERE replaced_by IS NOT NULL;
