"""Synthetic patients and fleet layout: deterministic, realistic enough, Arabic names intact."""

from __future__ import annotations

import random
import re
import unicodedata
from datetime import date

from simulators.population import REGIONS, Patient, Population, Sex, plan_fleet

TODAY = date(2025, 5, 21)
CIN = re.compile(r"[A-Z]{1,2}[0-9]{5,6}")


def _people(seed: int, count: int = 300) -> list[Patient]:
    population = Population(TODAY)
    rng = random.Random(seed)
    taounate = REGIONS[0].provinces[0]
    return list(population.panel(rng, taounate, count))


def test_same_seed_gives_the_same_people() -> None:
    assert _people(7) == _people(7)


def test_different_seeds_give_different_people() -> None:
    assert _people(7) != _people(8)


def test_about_two_thirds_are_women() -> None:
    population = Population(TODAY)
    rng = random.Random(1)
    provinces = [p for region in REGIONS for p in region.provinces]
    people = [population.patient(rng, rng.choice(provinces)) for _ in range(3000)]
    women = sum(p.sex is Sex.FEMALE for p in people) / len(people)
    assert 0.6 <= women <= 0.7


def test_national_ids_look_like_cin_and_are_unique() -> None:
    population = Population(TODAY)
    rng = random.Random(3)
    provinces = [p for region in REGIONS for p in region.provinces]
    people = [population.patient(rng, rng.choice(provinces)) for _ in range(2000)]
    assert all(CIN.fullmatch(p.cin) for p in people)
    assert len({p.cin for p in people}) == len(people)


def _is_arabic_script(text: str) -> bool:
    letters = [c for c in text if not c.isspace()]
    return bool(letters) and all("ARABIC" in unicodedata.name(c, "") for c in letters)


def test_arabic_names_are_non_empty_arabic_script() -> None:
    for patient in Population(TODAY).panel(random.Random(5), REGIONS[1].provinces[0], 500):
        assert _is_arabic_script(patient.given_name_ar)
        assert _is_arabic_script(patient.family_name_ar)
        assert _is_arabic_script(patient.name_ar)


def test_french_transliterations_are_latin_and_paired_with_arabic() -> None:
    population = Population(TODAY)
    people = population.panel(random.Random(9), REGIONS[0].provinces[0], 2000)
    pairs = {(p.given_name_ar, p.given_name_fr) for p in people}
    assert ("فاطمة الزهراء", "Fatima Zahra") in pairs
    assert all(p.name_fr and not _is_arabic_script(p.name_fr) for p in people)


def test_birth_dates_are_in_the_past_and_ages_plausible() -> None:
    for patient in _people(11, 1000):
        assert patient.birth_date < TODAY
        assert 0 <= patient.age(TODAY) <= 91


def test_pregnancy_only_for_women_of_childbearing_age() -> None:
    for patient in Population(TODAY).panel(random.Random(2), REGIONS[2].provinces[0], 3000):
        if "pregnancy" in patient.conditions:
            assert patient.sex is Sex.FEMALE
            assert 18 <= patient.age(TODAY) <= 42


def test_fleet_ids_carry_region_code_and_number_across_regions() -> None:
    fleet = plan_fleet(12, "UMMC-")
    assert fleet[0].unit_id == "UMMC-FM-001"
    assert fleet[0].province.name_fr == "Taounate"
    assert fleet[1].unit_id == "UMMC-DT-001"
    assert len({unit.unit_id for unit in fleet}) == 12
    assert all(re.fullmatch(r"UMMC-[A-Z]{2}-\d{3}", unit.unit_id) for unit in fleet)
    assert {unit.region.code for unit in fleet} >= {"FM", "DT", "BK", "OR"}


def test_large_fleet_numbers_units_within_their_region() -> None:
    fleet = plan_fleet(100, "X-")
    fes_meknes = [unit.unit_id for unit in fleet if unit.region.code == "FM"]
    assert fes_meknes[:3] == ["X-FM-001", "X-FM-002", "X-FM-003"]
    assert len(set(fes_meknes)) == len(fes_meknes)
