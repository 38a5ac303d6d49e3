-- DICOM index: study / series / instance, each instance with the location of its file (a name
-- the gateway generated, relative to QANTARA_DICOM_STORAGE), size, SHA-256 and transfer syntax
-- as received. The SOP Instance UID is the natural key: a redelivery is stored once. Text is
-- stored as decoded from the header's Specific Character Set.

CREATE TABLE dicom_study (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    study_uid            text NOT NULL UNIQUE,
    patient_id           bigint REFERENCES patient (id),
    dicom_patient_id     text NOT NULL DEFAULT '',       -- (0010,0020) as sent
    issuer_of_patient_id text NOT NULL DEFAULT '',       -- (0010,0021)
    patient_name         text NOT NULL DEFAULT '',       -- (0010,0010) decoded, with ^ and =
    patient_birth_date   date,
    patient_sex          text NOT NULL DEFAULT '',
    study_date           date,
    study_time           time,
    started              timestamptz,                    -- only when a UTC offset was sent
    study_id             text NOT NULL DEFAULT '',
    accession_number     text NOT NULL DEFAULT '',
    description          text NOT NULL DEFAULT '',
    referring_physician  text NOT NULL DEFAULT '',
    charset              text NOT NULL DEFAULT '',
    created_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dicom_study_patient_idx ON dicom_study (patient_id);
CREATE INDEX dicom_study_dicom_patient_idx ON dicom_study (dicom_patient_id);
CREATE INDEX dicom_study_date_idx ON dicom_study (study_date);
CREATE INDEX dicom_study_accession_idx ON dicom_study (accession_number)
    WHERE accession_number <> '';

CREATE TABLE dicom_series (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    study_id      bigint NOT NULL REFERENCES dicom_study (id),
    series_uid    text NOT NULL UNIQUE,
    modality      text NOT NULL DEFAULT '',
    series_number integer,
    description   text NOT NULL DEFAULT '',
    body_part     text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dicom_series_study_idx ON dicom_series (study_id);

CREATE TABLE dicom_instance (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    series_id        bigint NOT NULL REFERENCES dicom_series (id),
    sop_instance_uid text NOT NULL UNIQUE,
    sop_class_uid    text NOT NULL,
    instance_number  integer,
    content_date     date,
    transfer_syntax  text NOT NULL,
    file_path        text NOT NULL,                      -- relative to the storage folder
    size             bigint NOT NULL,
    sha256           bytea NOT NULL,
    calling_ae       text NOT NULL DEFAULT '',
    received_at      timestamptz NOT NULL,
    committed_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dicom_instance_series_idx ON dicom_instance (series_id);

-- Same SOP Instance UID received again with other content: the first is kept, this is counted.
CREATE TABLE dicom_conflict (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sop_instance_uid text NOT NULL,
    sha256           bytea NOT NULL,
    size             bigint NOT NULL,
    calling_ae       text NOT NULL DEFAULT '',
    received_at      timestamptz NOT NULL
);
CREATE INDEX dicom_conflict_uid_idx ON dicom_conflict (sop_instance_uid);
