"""`/fhir/Patient` by name, birthdate, gender and _id, with patients from HL7 ADT over MLLP."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from hl7.server import MllpServer, MllpSettings
from ingest.pipeline import GroupCommitPipeline, PipelineSettings
from monitoring.metrics import Metrics
from storage.writer import BatchWriter
from tests.hl7_support import MllpClient, adt, control_id, encode, new_id
from tests.http_support import validate_fhir


@pytest.fixture(scope="module")
async def mllp(api_pool: asyncpg.Pool) -> AsyncIterator[MllpServer]:
    metrics = Metrics()
    pipeline = GroupCommitPipeline(BatchWriter(api_pool), PipelineSettings(), metrics)
    pipeline_task = asyncio.create_task(pipeline.run())
    server = MllpServer(MllpSettings(port=0), pipeline, metrics)
    server_task = asyncio.create_task(server.run())
    await asyncio.wait_for(server.listening.wait(), 5)
    yield server
    server.stop()
    await asyncio.wait_for(server_task, 10)
    await pipeline.close()
    await asyncio.wait_for(pipeline_task, 10)


async def admit(server: MllpServer, names: str, *, birth: str = "19800214", sex: str = "F") -> str:
    """Send an ADT^A04 for a new CIN; returns the CIN."""
    cin = new_id()
    message = adt(control_id(), "A04", f"{cin}^^^CIN^NI", names, birth=birth, sex=sex)
    assert server.port is not None
    async with MllpClient("127.0.0.1", server.port) as client:
        assert (await client.request(encode(message))).code == "AA"
    return cin


async def search(
    client: httpx.AsyncClient, headers: dict[str, str], params: Any, status: int = 200
) -> dict[str, Any]:
    response = await client.get("/fhir/Patient", params=params, headers=headers)
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    validate_fhir(body)
    return body


def cins(bundle: dict[str, Any]) -> set[str]:
    return {
        i["value"]
        for e in bundle.get("entry", [])
        for i in e["resource"].get("identifier", [])
        if i["system"].endswith("/cin")
    }


def unique() -> str:
    """A family name no other test uses (letters only)."""
    return "Zq" + "".join(secrets.choice("bcdfghjklmnpqrstvwxz") for _ in range(8))


async def test_name_matches_a_prefix_of_any_part_ignoring_case_and_accents(
    mllp: MllpServer, client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    family = unique()
    cin = await admit(mllp, f"{family}é^Hélène")
    for query in (family.lower(), family.upper()[:5], f"{family}e", f"{family}É"):
        assert cins(await search(client, reader, {"name": query})) == {cin}, query


async def test_name_matches_the_given_name_without_accents(
    mllp: MllpServer, client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    given = unique()
    cin = await admit(mllp, f"Benali^{given}ïne")
    assert cins(await search(client, reader, {"name": f"{given}ine"})) == {cin}


async def test_arabic_name_is_matched_by_prefix_not_by_other_letters(
    mllp: MllpServer, client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    suffix = "".join(secrets.choice("ابتثجحخدذرزسشصضطظعغفقكلمنهوي") for _ in range(6))
    cin = await admit(mllp, f"بن{suffix}^فاطمة")
    assert cins(await search(client, reader, {"name": f"بن{suffix[:3]}"})) == {cin}
    assert cins(await search(client, reader, {"name": f"ين{suffix}"})) == set()


async def test_arabic_name_matches_whatever_its_hamza_teh_marbuta_and_short_vowels(
    mllp: MllpServer, client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    suffix = "".join(secrets.choice("بتثجحخدذرزسشصضطظعغفقكلمنوي") for _ in range(6))
    cin = await admit(mllp, f"أ{suffix}^{suffix}ة")  # as one hospital writes it
    # Bare alef, alef with hamza below or a fatha, heh: Arabic letters, not Latin look-alikes.
    variants = (f"ا{suffix}", f"إ{suffix[:3]}", f"أَ{suffix}", f"{suffix}ه", f"{suffix}ة")  # noqa: RUF001
    for query in variants:
        assert cins(await search(client, reader, {"name": query})) == {cin}, query


async def test_name_alternatives_separated_by_commas_match_either(
    mllp: MllpServer, client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    one, two = unique(), unique()
    first = await admit(mllp, f"{one}^Amina")
    second = await admit(mllp, f"{two}^Amina")
    assert cins(await search(client, reader, {"name": f"{one},{two}"})) == {first, second}


async def test_birthdate_and_gender_narrow_a_name_search(
    mllp: MllpServer, client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    family = unique()
    older = await admit(mllp, f"{family}^Ali", birth="19700101", sex="M")
    younger = await admit(mllp, f"{family}^Salma", birth="19950615", sex="F")
    assert cins(await search(client, reader, {"name": family, "birthdate": "1995"})) == {younger}
    assert cins(
        await search(client, reader, [("name", family), ("birthdate", "lt1980-01-01")])
    ) == {older}
    assert cins(await search(client, reader, {"name": family, "birthdate": "ne1970-01-01"})) == {
        younger
    }
    assert cins(await search(client, reader, {"name": family, "gender": "male"})) == {older}


async def test_id_search_returns_that_patient(
    mllp: MllpServer, client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    cin = await admit(mllp, f"{unique()}^Omar")
    found = await search(client, reader, {"identifier": cin})
    patient_id = found["entry"][0]["resource"]["id"]
    assert cins(await search(client, reader, {"_id": patient_id})) == {cin}


async def test_gender_alone_is_refused_naming_the_parameter(
    client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    outcome = await search(client, reader, {"gender": "female"}, status=400)
    assert "'identifier'" in outcome["issue"][0]["diagnostics"]


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"name": ""}, "name"),
        ({"birthdate": "1990-13"}, "birthdate"),
        ({"_id": "abc"}, "_id"),
        ({"name": "x", "gender": "robot"}, "gender"),
    ],
)
async def test_bad_patient_search_value_is_a_400_naming_the_parameter(
    client: httpx.AsyncClient, reader: dict[str, str], params: dict[str, str], parameter: str
) -> None:
    outcome = await search(client, reader, params, status=400)
    assert f"'{parameter}'" in outcome["issue"][0]["diagnostics"]


async def test_merged_patient_links_both_ways_and_name_search_finds_the_survivor(
    mllp: MllpServer, client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    family = unique()
    old_mrn = new_id("M")
    # The old record: known by its MRN only.
    assert mllp.port is not None
    async with MllpClient("127.0.0.1", mllp.port) as mc:
        message = adt(control_id(), "A04", f"{old_mrn}^^^CHU-RABAT^MR", f"{family}^Nadia")
        assert (await mc.request(encode(message))).code == "AA"
    old = (await search(client, reader, {"identifier": old_mrn}))["entry"][0]["resource"]["id"]
    cin = await admit(mllp, f"{family}^Nadia")
    assert len((await search(client, reader, {"name": family}))["entry"]) == 2
    async with MllpClient("127.0.0.1", mllp.port) as mc:
        message = adt(
            control_id(),
            "A40",
            f"{cin}^^^CIN^NI",
            f"{family}^Nadia",
            mrg=f"{old_mrn}^^^CHU-RABAT^MR",
        )
        assert (await mc.request(encode(message))).code == "AA"
    by_name = await search(client, reader, {"name": family})
    assert cins(by_name) == {cin}
    survivor = by_name["entry"][0]["resource"]
    assert {"other": {"reference": f"Patient/{old}"}, "type": "replaces"} in survivor["link"]
    merged = (await search(client, reader, {"_id": old}))["entry"][0]["resource"]
    assert merged["link"] == [
        {"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}
    ]
