"""Every Prometheus metric of Qantara, defined once on one registry.

Label values come from enums (`ingest.records.Protocol`, rejection reason slugs) or unit ids,
never from patient identifiers, message control ids or UIDs. Known label values are
pre-initialised so that series exist (at zero) before the first event.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PROTOCOLS = ("mqtt", "hl7", "dicom")
HL7_ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")
DICOM_REFUSAL_REASONS = (
    "application_context",
    "calling_ae",
    "certificate",
    "called_ae",
    "local_limit",
)
"""The reasons `dicom.negotiation` gives an A-ASSOCIATE-RJ (`Refused.reason`)."""
COMMITMENT_RESULTS = ("committed", "no_such_instance", "class_conflict")
"""How a Storage Commitment report answers for each instance (`dicom.commitment`)."""
COMMITMENT_REPORT_OUTCOMES = ("delivered", "refused", "undelivered", "dropped")
RETRIEVE_RESULTS = ("completed", "warning", "failed", "cancelled")
"""How a C-GET or C-MOVE sub-operation ended (`dicom.retrieve.Progress`, `dicom.retrieve_scp`)."""
TLS_LISTENERS = ("http", "mllp", "dicom")
HANDSHAKE_FAILURES = (
    "certificate",
    "no_certificate",
    "peer_refused",
    "protocol",
    "timeout",
    "closed",
)
"""The reasons `ingest.tls.handshake_failure` gives a failed TLS handshake."""

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Sent to received, for units on 2G/3G links that drop for hours: 1 s to 2 days.
_DELIVERY_BUCKETS = (
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    57600.0,
    86400.0,
    172800.0,
)


class Metrics:
    """The process's metrics; one instance per registry (tests make their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "qantara_messages_received_total",
            "Messages received, before validation.",
            ["protocol"],
            registry=r,
        )
        self.stored = Counter(
            "qantara_messages_stored_total",
            "Messages committed to the database for the first time.",
            ["protocol"],
            registry=r,
        )
        self.rejected = Counter(
            "qantara_messages_rejected_total",
            "Messages refused, by reason; each is kept as a dead letter.",
            ["protocol", "reason"],
            registry=r,
        )
        self.duplicate = Counter(
            "qantara_messages_duplicate_total",
            "Redeliveries of messages already committed: acknowledged again, stored once.",
            ["protocol"],
            registry=r,
        )
        self.ingest_latency = Histogram(
            "qantara_ingest_latency_seconds",
            "Time from receipt of a message to the commit of its batch.",
            ["protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.db_commit = Histogram(
            "qantara_db_commit_seconds",
            "Time to write and commit one batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "qantara_db_batch_envelopes",
            "Envelopes per committed batch.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
            registry=r,
        )
        self.pending = Gauge(
            "qantara_pipeline_pending",
            "Envelopes submitted to the pipeline and not yet resolved.",
            ["protocol"],
            registry=r,
        )
        self.db_available = Gauge(
            "qantara_db_available",
            "1 while the last database operation succeeded, 0 while commits fail.",
            registry=r,
        )
        self.db_errors = Counter(
            "qantara_db_errors_total",
            "Batches that failed, by kind (unavailable: retried; refused: split).",
            ["kind"],
            registry=r,
        )
        self.mllp_connections = Gauge(
            "qantara_mllp_connections", "Open MLLP connections.", registry=r
        )
        self.hl7_ack_latency = Histogram(
            "qantara_hl7_ack_latency_seconds",
            "Time from a complete MLLP frame to its HL7 acknowledgement written, by MSA-1 code.",
            ["code"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.http_requests = Counter(
            "qantara_http_requests_total",
            "Requests to the HTTP listener (FHIR, DICOMweb, health, metrics) by route template"
            " ('-': none matched, or refused beyond QANTARA_HTTP_MAX_CONNECTIONS) and status"
            " code; never a path, which may hold an identifier.",
            ["route", "code"],
            registry=r,
        )
        self.http_request_seconds = Histogram(
            "qantara_http_request_seconds",
            "Time from a request's head to the end of its response, by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dicom_associations = Gauge(
            "qantara_dicom_associations", "Open DICOM associations.", registry=r
        )
        self.dicom_associations_rejected = Counter(
            "qantara_dicom_associations_rejected_total",
            "DICOM associations refused (A-ASSOCIATE-RJ), by reason: application_context,"
            " calling_ae (not in the allowed list), certificate (not the AE title of the"
            " modality's certificate), called_ae, local_limit.",
            ["reason"],
            registry=r,
        )
        for reason in DICOM_REFUSAL_REASONS:
            self.dicom_associations_rejected.labels(reason)
        self.tls_handshake_failures = Counter(
            "qantara_tls_handshake_failures_total",
            "TLS handshakes of the listeners (http, mllp, dicom) that failed, by reason:"
            " certificate (did not verify), no_certificate, peer_refused (the peer did not"
            " accept ours), protocol (not TLS, nothing in common), timeout, closed.",
            ["listener", "reason"],
            registry=r,
        )
        self.tls_certificate_expiry = Gauge(
            "qantara_tls_certificate_expiry_timestamp_seconds",
            "When the certificate a TLS listener (http, mllp, dicom) presents stops being valid,"
            " Unix time; read at start and on SIGHUP.",
            ["listener"],
            registry=r,
        )
        self.tls_crl_next_update = Gauge(
            "qantara_tls_crl_next_update_timestamp_seconds",
            "When the CRL a TLS listener (mllp, dicom) checks client certificates against must be"
            " replaced, Unix time: past it, OpenSSL refuses every client certificate.",
            ["listener"],
            registry=r,
        )
        for listener in TLS_LISTENERS:
            for reason in HANDSHAKE_FAILURES:
                self.tls_handshake_failures.labels(listener, reason)
        self.mqtt_connected = Gauge(
            "qantara_mqtt_connected", "1 while connected to the MQTT broker.", registry=r
        )
        self.unit_last_seen = Gauge(
            "qantara_unit_last_seen_timestamp_seconds",
            "Last time a unit was heard from (vitals or status), Unix time.",
            ["unit"],
            registry=r,
        )
        self.unit_online = Gauge(
            "qantara_unit_online",
            "1 when the unit's retained status says online, 0 after its last will.",
            ["unit"],
            registry=r,
        )
        self.unit_backlog_age = Gauge(
            "qantara_unit_backlog_age_seconds",
            "Receive time minus the payload's sent_at of the unit's latest committed vitals"
            " message: how far behind real time its replay is (about 0 when live, never"
            " negative).",
            ["unit"],
            registry=r,
        )
        self.unit_clock_skew = Counter(
            "qantara_unit_clock_skew_total",
            "Committed vitals messages whose sent_at was later than their receipt by more than"
            " the clock-skew tolerance: the unit's clock is ahead.",
            ["unit"],
            registry=r,
        )
        self.mqtt_delivery_delay = Histogram(
            "qantara_mqtt_delivery_delay_seconds",
            "Committed vitals messages by the time from the payload's sent_at to their receipt"
            " (store-and-forward delay); messages from a clock ahead beyond the tolerance are"
            " left out.",
            buckets=_DELIVERY_BUCKETS,
            registry=r,
        )
        self.units_tracked = Gauge(
            "qantara_units_tracked",
            "Units with a per-unit series (bounded by the configured cap).",
            registry=r,
        )
        self.dicom_stored_bytes = Counter(
            "qantara_dicom_stored_bytes_total",
            "Bytes of DICOM files stored and indexed for the first time.",
            registry=r,
        )
        self.dicom_store_seconds = Histogram(
            "qantara_dicom_store_seconds",
            "C-STORE handling time, dataset received to status sent (file fsync and index commit).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dicom_conflicts = Counter(
            "qantara_dicom_conflicts_total",
            "SOP Instance UIDs received again with other content (the first copy is kept).",
            registry=r,
        )
        self.dicom_unavailable = Counter(
            "qantara_dicom_unavailable_total",
            "C-STORE answered 0xA700 (database or disk unavailable), by what failed.",
            ["cause"],
            registry=r,
        )
        for cause in ("database", "disk"):
            self.dicom_unavailable.labels(cause)
        self.dicom_commitments = Counter(
            "qantara_dicom_commitment_instances_total",
            "Instances named in Storage Commitment requests, by what the report said:"
            " committed, no_such_instance, class_conflict.",
            ["result"],
            registry=r,
        )
        for result in COMMITMENT_RESULTS:
            self.dicom_commitments.labels(result)
        self.dicom_commitment_reports = Counter(
            "qantara_dicom_commitment_reports_total",
            "Storage Commitment reports (N-EVENT-REPORT) by outcome: delivered (the modality"
            " answered Success), refused (it answered a failure on the association of the"
            " request), undelivered (its own port unreachable after every retry), dropped"
            " (the queue full, the request answered 0x0213; or the AE title no longer has a"
            " report address).",
            ["outcome"],
            registry=r,
        )
        for outcome in COMMITMENT_REPORT_OUTCOMES:
            self.dicom_commitment_reports.labels(outcome)
        self.dicom_commitment_reports_pending = Gauge(
            "qantara_dicom_commitment_reports_pending",
            "Storage Commitment reports waiting in the database for a modality's own port"
            " (being tried, or waiting for their next try), all replicas', as last read.",
            registry=r,
        )
        self.dicom_retrieved = Counter(
            "qantara_dicom_retrieve_instances_total",
            "C-GET and C-MOVE sub-operations (an instance sent with C-STORE) by result: completed,"
            " warning (the peer answered a B000-family status), failed (a failure status, no"
            " presentation context for its SOP class and transfer syntax, its file unreadable,"
            " the C-MOVE destination unreachable or gone), cancelled (not sent after a"
            " C-CANCEL).",
            ["result"],
            registry=r,
        )
        for result in RETRIEVE_RESULTS:
            self.dicom_retrieved.labels(result)
        self.dicom_retrieved_bytes = Counter(
            "qantara_dicom_retrieve_bytes_total",
            "Dataset bytes sent in C-GET and C-MOVE sub-operations.",
            registry=r,
        )
        self.dicom_unindexed_files = Gauge(
            "qantara_dicom_unindexed_files",
            "Files of the DICOM store that no index row names, found by the listener's start-up "
            "scan and kept (a crash's leftovers, or images a database restored from an older "
            "backup lost); counted again every sweep interval until a reindex indexes them.",
            registry=r,
        )
        self.dicom_orphans_removed = Counter(
            "qantara_dicom_orphans_removed_total",
            "Complete DICOM files answered without success (0xA700) that no index row named "
            "after orphan_age, removed by the orphan sweep.",
            registry=r,
        )
        self.ready = Gauge(
            "qantara_ready",
            "1 while every readiness check holds (what /readyz answers 200 for), else 0.",
            registry=r,
        )
        self.readiness_check = Gauge(
            "qantara_readiness_check",
            "1 while the named readiness check holds (database, mqtt, http, mllp, dicom), else 0.",
            ["check"],
            registry=r,
        )
        self.dicom_storage_free = Gauge(
            "qantara_dicom_storage_free_bytes",
            "Bytes available to the gateway on the file system of the DICOM store.",
            registry=r,
        )
        self.dicom_storage_total = Gauge(
            "qantara_dicom_storage_total_bytes",
            "Size in bytes of the file system of the DICOM store.",
            registry=r,
        )
        self._dicom_storage_mounted: Gauge | None = None  # `storage_mounted`
        self.dicom_storage_reserved = Gauge(
            "qantara_dicom_storage_reserved_bytes",
            "Free bytes of the DICOM store's file system that C-STOREs leave "
            "(QANTARA_DICOM_MIN_FREE_SPACE): below them they are answered 0xA700.",
            registry=r,
        )
        self.ready.set(0)
        self.db_available.set(0)
        for protocol in PROTOCOLS:
            self.received.labels(protocol)
            self.stored.labels(protocol)
            self.duplicate.labels(protocol)
            self.ingest_latency.labels(protocol)
            self.pending.labels(protocol)
        for kind in ("unavailable", "refused"):
            self.db_errors.labels(kind)
        for code in HL7_ACK_CODES:
            self.hl7_ack_latency.labels(code)

    def init_reasons(self, protocol: str, reasons: Iterable[str]) -> None:
        """Create the rejection series of known reasons, at zero."""
        for reason in reasons:
            self.rejected.labels(protocol, reason)

    def storage_mounted(self, mounted: bool) -> None:
        """Set `qantara_dicom_storage_mounted`, registered at its first use: a gateway without a
        mount check file does not export it (a 0 there would read as a volume gone)."""
        if self._dicom_storage_mounted is None:
            self._dicom_storage_mounted = Gauge(
                "qantara_dicom_storage_mounted",
                "1 while the DICOM store's mount check file (QANTARA_DICOM_STORAGE_CHECK_FILE) "
                "exists, 0 when its volume is not mounted (C-STOREs answered 0xA700).",
                registry=self.registry,
            )
        self._dicom_storage_mounted.set(1 if mounted else 0)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The current value of one series (tests and readiness)."""
        return self.registry.get_sample_value(name, labels or {})


VERIFY_RESULTS = ("intact", "missing", "size", "corrupt", "unreadable", "misnamed")
"""How `qantara dicom verify` finds an indexed instance's file (`dicom.verify.RESULTS`)."""
VERIFY_SCOPES = ("all", "partial")
"""A run over the whole index, or over part of it (`--since`, `--after-id`): two timers (a weekly
whole check, a nightly one of the day's intake) write two files of distinct series."""


class VerifyMetrics:
    """The last `qantara dicom verify` run of a scope, written with `--textfile` for
    node_exporter's textfile collector: the check runs from a timer, not in the gateway, so
    nothing scrapes it live."""

    def __init__(self, scope: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances = Gauge(
            "qantara_dicom_verify_instances",
            "Indexed instances the last `qantara dicom verify` of a scope checked, by result: "
            "intact, or missing, size, corrupt, unreadable, misnamed (the file is damaged).",
            ["scope", "result"],
            registry=r,
        )
        self.bytes_read = Gauge(
            "qantara_dicom_verify_read_bytes",
            "Bytes of DICOM files the last `qantara dicom verify` of a scope read.",
            ["scope"],
            registry=r,
        )
        self.duration = Gauge(
            "qantara_dicom_verify_duration_seconds",
            "How long the last `qantara dicom verify` of a scope ran.",
            ["scope"],
            registry=r,
        )
        self.completed = Gauge(
            "qantara_dicom_verify_completion_timestamp_seconds",
            "When the last `qantara dicom verify` of a scope ended (Unix time).",
            ["scope"],
            registry=r,
        )
        self.scope = scope
        for result in VERIFY_RESULTS:
            self.instances.labels(scope, result)
