"""Migration 0019 folds Arabic spelling variants for matching, and folds again the names stored
before it: a database upgraded from 0018 finds its patients and studies as a new one does."""

from __future__ import annotations

import json

import asyncpg

from storage.migrations import _apply, apply_migrations, available_migrations


async def test_names_stored_before_the_migration_are_folded_again_and_kept_as_written(
    fresh_dsn: str,
) -> None:
    conn = await asyncpg.connect(fresh_dsn)
    try:
        # A database of the release before, with an Arabic and a French patient.
        await _apply(conn, [m for m in available_migrations() if m.version < 19])
        names = [{"text": "فاطمة أحمد", "family": "أحمد", "given": ["فاطمة"]}]
        arabic = await conn.fetchval(
            "INSERT INTO patient (names, family, given) VALUES ($1::jsonb, $2, $3) RETURNING id",
            json.dumps(names, ensure_ascii=False),
            "أحمد",
            ["فاطمة"],
        )
        french = await conn.fetchval(
            "INSERT INTO patient (names, family, given) "
            "VALUES ('[]'::jsonb, 'Benani', '{Hélène}') RETURNING id"
        )
        await conn.execute(
            "INSERT INTO dicom_study (patient_id, study_uid, patient_name, referring_physician) "
            "VALUES ($1, '1.2.3', 'أحمد^فاطمة', 'إبراهيم^علي')",
            arabic,
        )
        assert [m.version for m in await apply_migrations(conn)] == [19]

        async def parts(patient: int) -> list[str]:
            rows = await conn.fetch(
                "SELECT part FROM patient_name_part WHERE patient_id = $1 ORDER BY part", patient
            )
            return [r["part"] for r in rows]

        assert await parts(arabic) == ["احمد", "فاطمه", "فاطمه احمد"]
        assert await parts(french) == ["benani", "helene"]
        study = await conn.fetchrow(
            "SELECT patient_name, patient_name_folded, referring_physician_folded FROM dicom_study"
        )
        assert tuple(study) == ("أحمد^فاطمة", "احمد^فاطمه", "ابراهيم^علي")
        assert await conn.fetchval("SELECT family FROM patient WHERE id = $1", arabic) == "أحمد"
    finally:
        await conn.close()
