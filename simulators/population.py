"""Synthetic patients of the rural provinces served by connected mobile medical units (UMMC).

Everything here is deterministic for a given seed: a `Population` draws from the
`random.Random` it is handed, so the same seed gives the same people, national ids and
birth dates on every run (birth dates are relative to the `today` the caller passes).

Figures follow the programme's published ones where there are some: about 65 % of the
people seen by the units are women; the units work in rural provinces of Fès-Meknès,
Drâa-Tafilalet, Béni Mellal-Khénifra, the Oriental and other regions. Names come in Arabic
script with their usual French transliteration. CIN prefixes are illustrative (modelled on
issuing-office letters), not a registry mapping.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import date, timedelta

__all__ = [
    "REGIONS",
    "Condition",
    "Deployment",
    "Patient",
    "Population",
    "Province",
    "Region",
    "Sex",
    "plan_fleet",
]

FEMALE_SHARE = 0.65


@dataclass(frozen=True, slots=True)
class Province:
    name_fr: str
    name_ar: str
    region_code: str
    cin_prefixes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Region:
    code: str
    name_fr: str
    name_ar: str
    provinces: tuple[Province, ...]


def _region(code: str, name_fr: str, name_ar: str, *provinces: tuple[str, str, str]) -> Region:
    return Region(
        code=code,
        name_fr=name_fr,
        name_ar=name_ar,
        provinces=tuple(
            Province(name_fr=fr, name_ar=ar, region_code=code, cin_prefixes=tuple(cin.split()))
            for fr, ar, cin in provinces
        ),
    )


REGIONS: tuple[Region, ...] = (
    _region(
        "FM",
        "Fès-Meknès",
        "فاس مكناس",
        ("Taounate", "تاونات", "CD CN"),
        ("Taza", "تازة", "Z ZG"),
        ("Sefrou", "صفرو", "C CF"),
        ("Boulemane", "بولمان", "CB"),
        ("Moulay Yacoub", "مولاي يعقوب", "CC"),
        ("Ifrane", "إفران", "DA"),
        ("El Hajeb", "الحاجب", "D DN"),
    ),
    _region(
        "DT",
        "Drâa-Tafilalet",
        "درعة تافيلالت",
        ("Errachidia", "الرشيدية", "U UA"),
        ("Midelt", "ميدلت", "UC"),
        ("Tinghir", "تنغير", "UD"),
        ("Zagora", "زاكورة", "JZ"),
        ("Ouarzazate", "ورزازات", "J JE"),
    ),
    _region(
        "BK",
        "Béni Mellal-Khénifra",
        "بني ملال خنيفرة",
        ("Azilal", "أزيلال", "I IC"),
        ("Khénifra", "خنيفرة", "Q QA"),
        ("Béni Mellal", "بني ملال", "I IA"),
        ("Fquih Ben Salah", "الفقيه بن صالح", "IB"),
    ),
    _region(
        "OR",
        "Oriental",
        "الشرق",
        ("Figuig", "فكيك", "FA"),
        ("Jerada", "جرادة", "FB"),
        ("Taourirt", "تاوريرت", "FH"),
        ("Guercif", "جرسيف", "ZT"),
        ("Driouch", "الدريوش", "S SH"),
    ),
    _region(
        "MS",
        "Marrakech-Safi",
        "مراكش آسفي",
        ("Al Haouz", "الحوز", "E EE"),
        ("Chichaoua", "شيشاوة", "EA"),
    ),
    _region(
        "SM",
        "Souss-Massa",
        "سوس ماسة",
        ("Taroudant", "تارودانت", "J JT"),
        ("Tata", "طاطا", "JK"),
    ),
    _region(
        "TT",
        "Tanger-Tétouan-Al Hoceïma",
        "طنجة تطوان الحسيمة",
        ("Chefchaouen", "شفشاون", "LC"),
        ("Al Hoceïma", "الحسيمة", "R"),
        ("Ouezzane", "وزان", "GN"),
    ),
    _region(
        "RS",
        "Rabat-Salé-Kénitra",
        "الرباط سلا القنيطرة",
        ("Khémisset", "الخميسات", "X XA"),
        ("Sidi Kacem", "سيدي قاسم", "GK"),
    ),
)

# (Arabic, French transliteration)
_FEMALE_GIVEN: tuple[tuple[str, str], ...] = (
    ("فاطمة الزهراء", "Fatima Zahra"),
    ("فاطمة", "Fatima"),
    ("خديجة", "Khadija"),
    ("عائشة", "Aïcha"),
    ("مريم", "Meryem"),
    ("زينب", "Zineb"),
    ("حفصة", "Hafsa"),
    ("نعيمة", "Naïma"),
    ("سعاد", "Souad"),
    ("رشيدة", "Rachida"),
    ("فتيحة", "Fatiha"),
    ("حليمة", "Halima"),
    ("مليكة", "Malika"),
    ("لطيفة", "Latifa"),
    ("يامنة", "Yamna"),
    ("إيطو", "Itto"),
    ("تودة", "Touda"),
    ("ميمونة", "Mimouna"),
    ("الزهرة", "Zahra"),
    ("السعدية", "Saadia"),
    ("كلثوم", "Keltoum"),
    ("نجاة", "Najat"),
    ("هند", "Hind"),
    ("سلمى", "Salma"),
    ("إكرام", "Ikram"),
    ("وفاء", "Wafae"),
    ("أسماء", "Asmae"),
    ("هاجر", "Hajar"),
    ("سكينة", "Sakina"),
    ("رقية", "Rkia"),
    ("فاطنة", "Fatna"),
    ("إيمان", "Imane"),
    ("خدوج", "Khaddouj"),
    ("حسناء", "Hasnaa"),
    ("يسرى", "Yousra"),
)

_MALE_GIVEN: tuple[tuple[str, str], ...] = (
    ("محمد", "Mohammed"),
    ("أحمد", "Ahmed"),
    ("عبد الله", "Abdellah"),
    ("حسن", "Hassan"),
    ("يوسف", "Youssef"),
    ("إبراهيم", "Brahim"),
    ("عمر", "Omar"),
    ("مصطفى", "Mustapha"),
    ("عبد الرحمان", "Abderrahmane"),
    ("عبد الكريم", "Abdelkrim"),
    ("إدريس", "Driss"),
    ("رشيد", "Rachid"),
    ("سعيد", "Saïd"),
    ("الحسن", "Lahcen"),
    ("الحسين", "Lhoussaine"),
    ("موحى", "Moha"),
    ("علي", "Ali"),
    ("حمو", "Hammou"),
    ("عبد السلام", "Abdeslam"),
    ("المهدي", "Mehdi"),
    ("أيوب", "Ayoub"),
    ("حمزة", "Hamza"),
    ("بوشعيب", "Bouchaïb"),
    ("العربي", "Larbi"),
    ("الطيب", "Taïeb"),
    ("ميمون", "Mimoun"),
    ("خالد", "Khalid"),
    ("نور الدين", "Noureddine"),
)

_FAMILY: tuple[tuple[str, str], ...] = (
    ("بنعلي", "Benali"),
    ("العلوي", "Alaoui"),
    ("الإدريسي", "Idrissi"),
    ("بناني", "Bennani"),
    ("الفاسي", "El Fassi"),
    ("التازي", "Tazi"),
    ("الشرايبي", "Chraibi"),
    ("برادة", "Berrada"),
    ("أمزيان", "Amziane"),
    ("أوحمو", "Ouhammou"),
    ("آيت علي", "Ait Ali"),
    ("آيت الحاج", "Ait Lhaj"),
    ("أوعلي", "Ouali"),
    ("بوزيان", "Bouziane"),
    ("الزروالي", "Zerouali"),
    ("الغياتي", "Ghiati"),
    ("التسولي", "Tsouli"),
    ("الحياني", "Hayani"),
    ("المرنيسي", "Mernissi"),
    ("الصنهاجي", "Senhaji"),
    ("الدرقاوي", "Derkaoui"),
    ("أمغار", "Amghar"),
    ("أوبلا", "Oubella"),
    ("بوعزة", "Bouazza"),
    ("الحمداوي", "Hamdaoui"),
    ("الزموري", "Zemmouri"),
    ("بلحاج", "Belhaj"),
    ("بنموسى", "Benmoussa"),
    ("الدرعي", "Draoui"),
    ("الفيلالي", "Filali"),
    ("الزياني", "Zayani"),
    ("اليزناسني", "Yaznasni"),
    ("الشاوي", "Chaoui"),
    ("الرحماني", "Rahmani"),
    ("الوزاني", "Ouazzani"),
    ("الكتاني", "Kettani"),
)


class Sex(enum.StrEnum):
    FEMALE = "F"
    MALE = "M"


class Condition(enum.StrEnum):
    """What changes a patient's baseline vitals."""

    HYPERTENSION = "hypertension"
    DIABETES = "diabetes"
    PREGNANCY = "pregnancy"
    FEVER = "fever"
    CHRONIC_LUNG = "chronic-lung"


@dataclass(frozen=True, slots=True)
class Patient:
    cin: str
    sex: Sex
    given_name_fr: str
    family_name_fr: str
    given_name_ar: str
    family_name_ar: str
    birth_date: date
    province: Province
    conditions: frozenset[Condition]

    @property
    def name_fr(self) -> str:
        return f"{self.given_name_fr} {self.family_name_fr}"

    @property
    def name_ar(self) -> str:
        return f"{self.given_name_ar} {self.family_name_ar}"

    def age(self, on: date) -> int:
        years = on.year - self.birth_date.year
        if (on.month, on.day) < (self.birth_date.month, self.birth_date.day):
            years -= 1
        return years


# Age bands of the people the units see: many children and elderly, chronic patients.
_AGE_BANDS: tuple[tuple[int, int, float], ...] = (
    (0, 4, 0.10),
    (5, 14, 0.10),
    (15, 39, 0.27),
    (40, 59, 0.25),
    (60, 90, 0.28),
)


class Population:
    """Draws patients; national ids (CIN) are unique within one `Population`."""

    def __init__(self, today: date) -> None:
        self._today = today
        self._cins: set[str] = set()

    def patient(self, rng: random.Random, province: Province) -> Patient:
        sex = Sex.FEMALE if rng.random() < FEMALE_SHARE else Sex.MALE
        given = rng.choice(_FEMALE_GIVEN if sex is Sex.FEMALE else _MALE_GIVEN)
        family = rng.choice(_FAMILY)
        low, high = _pick_band(rng)
        birth_date = self._today - timedelta(days=rng.randint(low * 365 + 1, high * 365 + 364))
        age = (self._today - birth_date).days // 365
        return Patient(
            cin=self._new_cin(rng, province),
            sex=sex,
            given_name_fr=given[1],
            family_name_fr=family[1],
            given_name_ar=given[0],
            family_name_ar=family[0],
            birth_date=birth_date,
            province=province,
            conditions=_conditions(rng, sex, age),
        )

    def panel(self, rng: random.Random, province: Province, size: int) -> tuple[Patient, ...]:
        """The people one unit sees in its province (they come back for follow-ups)."""
        return tuple(self.patient(rng, province) for _ in range(size))

    def _new_cin(self, rng: random.Random, province: Province) -> str:
        while True:
            prefix = rng.choice(province.cin_prefixes)
            digits = 6 if len(prefix) == 1 else rng.choice((5, 6))
            cin = f"{prefix}{rng.randrange(10 ** (digits - 1), 10**digits)}"
            if cin not in self._cins:
                self._cins.add(cin)
                return cin


def _pick_band(rng: random.Random) -> tuple[int, int]:
    roll = rng.random()
    for low, high, share in _AGE_BANDS:
        if roll < share:
            return low, high
        roll -= share
    return _AGE_BANDS[-1][0], _AGE_BANDS[-1][1]


def _conditions(rng: random.Random, sex: Sex, age: int) -> frozenset[Condition]:
    found: set[Condition] = set()
    if age >= 40 and rng.random() < (0.25 if age < 60 else 0.45):
        found.add(Condition.HYPERTENSION)
    if age >= 35 and rng.random() < (0.10 if age < 60 else 0.18):
        found.add(Condition.DIABETES)
    if sex is Sex.FEMALE and 18 <= age <= 42 and rng.random() < 0.2:
        found.add(Condition.PREGNANCY)
    if age >= 45 and rng.random() < 0.06:
        found.add(Condition.CHRONIC_LUNG)
    if rng.random() < 0.06:
        found.add(Condition.FEVER)
    return frozenset(found)


@dataclass(frozen=True, slots=True)
class Deployment:
    """Where one unit works: `unit_id` is prefix + region code + number in the region."""

    unit_id: str
    region: Region
    province: Province


def _deployment_order() -> tuple[Province, ...]:
    """Provinces taken one region after the other, so that small fleets span regions."""
    order: list[Province] = []
    depth = max(len(region.provinces) for region in REGIONS)
    for index in range(depth):
        order.extend(region.provinces[index] for region in REGIONS if index < len(region.provinces))
    return tuple(order)


_DEPLOYMENT_ORDER = _deployment_order()
_REGION_BY_CODE = {region.code: region for region in REGIONS}


def plan_fleet(count: int, prefix: str = "UMMC-") -> tuple[Deployment, ...]:
    """`count` units over the provinces, e.g. `UMMC-FM-001` (Taounate), `UMMC-DT-001`..."""
    if count < 0:
        raise ValueError("count must be >= 0")
    numbers: dict[str, int] = {}
    fleet: list[Deployment] = []
    for index in range(count):
        province = _DEPLOYMENT_ORDER[index % len(_DEPLOYMENT_ORDER)]
        number = numbers.get(province.region_code, 0) + 1
        numbers[province.region_code] = number
        fleet.append(
            Deployment(
                unit_id=f"{prefix}{province.region_code}-{number:03d}",
                region=_REGION_BY_CODE[province.region_code],
                province=province,
            )
        )
    return tuple(fleet)
