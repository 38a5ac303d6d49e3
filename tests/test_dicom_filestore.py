"""Which folders a stored file's name needs fsynced: its shard folder always, the parents only
while their entries may not be durable yet."""

from __future__ import annotations

import secrets
from pathlib import Path

from dicom.filestore import TMP_SUFFIX, FileStore, StagedFile, StoredFile


def opened(root: Path) -> FileStore:
    store = FileStore(root)
    store.open()
    return store


def commit(store: FileStore, shard: str) -> StoredFile:
    """A file whose SHA-256 starts with `shard` (4 hex digits), committed."""
    staged = store.tmp / f"{secrets.token_hex(8)}{TMP_SUFFIX}"
    staged.write_bytes(b"\0" * 128 + b"DICM")
    return store.commit(StagedFile(staged, bytes.fromhex(shard) + secrets.token_bytes(30), 132))


def test_a_file_in_a_new_shard_needs_its_folder_the_parent_and_the_root(tmp_path: Path) -> None:
    store = opened(tmp_path)
    stored = commit(store, "abcd")
    root = store.root
    assert stored.folders == (root / "ab" / "cd", root / "ab", root)


def test_a_file_in_a_folder_made_durable_needs_only_that_folder(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.mark_durable(commit(store, "abcd"))
    assert commit(store, "abcd").folders == (store.root / "ab" / "cd",)
    assert commit(store, "abef").folders == (store.root / "ab" / "ef", store.root / "ab")


def test_a_restarted_store_counts_the_folders_already_there_as_durable(tmp_path: Path) -> None:
    first = opened(tmp_path)
    commit(first, "abcd")  # never marked durable: the process died before its fsyncs
    restarted = opened(tmp_path)
    root = restarted.root
    assert commit(restarted, "abcd").folders == (root / "ab" / "cd",)
    assert commit(restarted, "ab01").folders == (root / "ab" / "01", root / "ab")


def test_a_shard_created_after_the_restart_still_needs_its_parents(tmp_path: Path) -> None:
    restarted = opened(tmp_path)
    other = FileStore(tmp_path)  # a replica sharing the store creates a shard meanwhile
    commit(other, "0123")
    root = restarted.root
    assert commit(restarted, "0123").folders == (root / "01" / "23", root / "01", root)
