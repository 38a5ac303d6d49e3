"""The DICOM listener's slice of the settings: every limit of the SCP in one frozen dataclass.

Built once by `gateway.settings.Settings.load`; imports nothing of the listener, so that settings
can be read without it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ingest.errors import ConfigError
from ingest.tls import server_context


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """What a spool file checks before it writes: `reserve`, the free bytes of the file system it
    leaves (0: none but the kernel's own); `mount_check`, a file that exists only while the
    store's volume is mounted (None: no check)."""

    reserve: int = 0
    mount_check: Path | None = None


NO_LIMITS: Final = StoreLimits()


@dataclass(frozen=True, slots=True)
class AeAddress:
    """Where the gateway calls an AE title on an association of its own: a modality's port for
    its Storage Commitment reports, a C-MOVE destination; over TLS when `tls` (`tls://` in the
    setting), the peer's certificate checked against `DicomSettings.outbound_tls_ca`."""

    ae_title: str
    host: str
    port: int
    tls: bool = False


@dataclass(frozen=True, slots=True)
class DicomSettings:
    """`allowed_aes` empty means any calling AE title is accepted; `retrieve_aes` empty means
    nobody may C-GET or C-MOVE."""

    port: int = 11112
    ae_title: str = "QANTARA"
    storage: Path = Path("./var/dicom")
    allowed_aes: frozenset[str] = frozenset()
    retrieve_aes: frozenset[str] = frozenset()  # the calling AE titles that may C-GET, C-MOVE
    query_aes: frozenset[str] | None = None  # those that may C-FIND; None: any
    require_called_ae: bool = False  # refuse associations addressed to another AE title
    max_associations: int = 16
    max_pdu: int = 1 << 20
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 120.0
    store_timeout: float = 60.0  # waiting for the index commit before answering 0xA700
    max_find_results: int = 1000
    min_free_space: int = 1 << 30
    """Bytes of the store's file system that C-STOREs leave free (answered 0xA700 "disk full"
    instead): room for what shares it, PostgreSQL first. 0: only a full disk refuses."""
    storage_check_file: Path | None = None
    """A file that exists only while the store's volume is mounted (relative: to `storage`):
    without it the listener does not start, and refuses C-STOREs (0xA700). None: no check."""
    orphan_age: float = 600.0  # a file answered 0xA700 and never indexed is removed this old
    orphan_lookback: float = 2 * 86400.0  # the start-up scan looks at files this recent
    sweep_interval: float = 600.0  # stale temp files and suspected orphans checked this often
    tls_cert: Path | None = None  # with tls_key: DICOM over TLS only (PS3.15 B.1, port 2762)
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # callers must present a certificate it signed
    tls_crl: Path | None = None  # with tls_client_ca: the modalities' certificates it revokes
    tls_ae_from_cn: bool = False  # the calling AE title must be a commonName of that certificate
    report_addresses: tuple[AeAddress, ...] = ()
    """The modalities that take their Storage Commitment reports on an association of their own;
    the others get theirs on the association of the request."""

    move_destinations: tuple[AeAddress, ...] = ()
    """The AE titles a C-MOVE may name as its destination, and where they listen."""
    outbound_tls_ca: Path | None = None  # checks the certificates of the `tls://` addresses
    outbound_tls_cert: Path | None = None  # with outbound_tls_key: ours, for mutual TLS
    outbound_tls_key: Path | None = None

    def limits(self) -> StoreLimits:
        """What each received file checks before it is written (`dicom.spool`)."""
        check = self.storage_check_file
        return StoreLimits(self.min_free_space, None if check is None else self.storage / check)

    def require_mounted(self) -> None:
        """Raise ConfigError when the store's mount check file is missing: its volume is not
        mounted, and its folder is the disk beneath (blocking: a `stat`)."""
        check = self.limits().mount_check
        if check is not None and not check.exists():
            raise ConfigError(
                f"QANTARA_DICOM_STORAGE_CHECK_FILE: {check} does not exist: is the DICOM "
                "store's volume mounted?"
            )

    def report_address(self, ae_title: str) -> AeAddress | None:
        return next((a for a in self.report_addresses if a.ae_title == ae_title), None)

    def move_destination(self, ae_title: str) -> AeAddress | None:
        return next((a for a in self.move_destinations if a.ae_title == ae_title), None)

    def outbound_ssl_context(self) -> ssl.SSLContext | None:
        """The client context of the associations the gateway opens to `tls://` addresses
        (their certificate and host name checked), or None without `outbound_tls_ca`. Raises
        OSError (ssl.SSLError) or ValueError for files that cannot be loaded."""
        if self.outbound_tls_ca is None:
            return None
        context = ssl.create_default_context(cafile=self.outbound_tls_ca)
        if self.outbound_tls_cert is not None:
            context.load_cert_chain(self.outbound_tls_cert, self.outbound_tls_key)
        return context

    def ssl_context(self) -> ssl.SSLContext | None:
        """The listener's TLS context when a certificate is configured, else None."""
        return server_context(self.tls_cert, self.tls_key, self.tls_client_ca, self.tls_crl)
