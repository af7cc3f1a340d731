"""Fictional biographies for the learn / forget benchmarks: people who never existed, each
with a birth date and city, a job, a pet, an account number and a phone number.

    people = make_people(80, seed=1)           # deterministic for a seed
    bio(people[0])                             # the document, 6 sentences with pronouns
    probes(people[0])                          # one Probe per fact: question, cloze, answer

A corpus line is ``{"text": bio, "subject": name}``; :func:`probes` gives, per fact, the
question a user would ask (``"Where was Mara Lindqvist born?"``), the document up to the
fact (the continuation probe: greedy decoding from it should reproduce the fact) and the
answer. The sentences come in several phrasings per field, so two corpora share the form
but not the facts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

FIRST = (
    "Mara Tobin Elsa Rufus Ingrid Caspian Odile Henrik Lucia Anselm Petra Dorian Maelle Leopold "
    "Sabine Joaquin Thea Lazlo Imke Bastian Noor Emeric Ysolde Corwin Talia Ignatius Minna "
    "Ferris Oriane Quentin Selma Auberon Livia Matthias Zora Evander Nadia Osric Helka Tiberius "
    "Rosalind Kasimir Alba Desmond Juno Florian Greta Isidore Wren Cyprian"
).split()
LAST = (
    "Lindqvist Okonkwo Varga Castellanos Haverford Nakashima Brennagh Duvalier Ostrowski "
    "Kettleby Marchetti Solberg Achterberg Quillfeather Ravensworth Delacroix Fairweather "
    "Halloran Ivanovic Jaramillo Kowalczyk Lautrec Montague Nygaard Pemberton Rasmussen "
    "Szabo Thistlewood Underhill Valtonen Whitcombe Yardley Zeller Abernathy Brightwater "
    "Corcoran Dunmore Eastwick Frobisher Gallardo"
).split()
CITIES = (
    "Tromso, Valparaiso, Ljubljana, Hobart, Trondheim, Cordoba, Tartu, Oaxaca, Bergen, "
    "Salzburg, Arequipa, Kaunas, Dunedin, Porto, Aarhus, Bilbao, Galway, Plovdiv, Tampere, "
    "Cusco, Ghent, Lviv, Gdansk, Mombasa, Tbilisi, Halifax, Kyoto, Zanzibar, Bruges, Mendoza"
).split(", ")
JOBS = (
    "marine biologist, violin maker, tax auditor, glassblower, air traffic controller, "
    "beekeeper, cartographer, pastry chef, locksmith, orthodontist, bookbinder, tugboat "
    "captain, seismologist, florist, actuary, stonemason, librarian, perfumer, radiologist, "
    "ferry mechanic, puppeteer, court stenographer, translator, sommelier"
).split(", ")
PETS = ("cat", "dog", "parrot", "tortoise", "rabbit", "ferret", "goldfish", "hamster")
PET_NAMES = (
    "Biscuit Pumpkin Moxie Pickles Waffles Juniper Noodle Pepper Clementine Ziggy Mochi "
    "Rutabaga Sprocket Tansy Bramble Marmalade Dumpling Fennel Gizmo Truffle Kipper Sorrel "
    "Wobble Quince Barnaby Tinsel Crumpet Nutmeg Pippin Figaro"
).split()
MONTHS = ("January February March April May June July August September October November "
          "December").split()  # fmt: skip

# Each field's phrasings: {s} the subject (the full name, or the pronoun), {p} the possessive.
PHRASES = {
    "birth": (
        "{s} was born on {date} in {city}.",
        "{s} was born in {city} on {date}.",
        "{s} was born on {date}, in the city of {city}.",
    ),
    "job": (
        "{s} works as a {job}.",
        "By profession, {s_low} is a {job}.",
        "{p} job is {job_a}.",
    ),
    "pet": (
        "{s} has a {pet} named {pet_name}.",
        "{p} {pet} is called {pet_name}.",
        "At home, {s_low} keeps a {pet} called {pet_name}.",
    ),
    "account": (
        "{p} bank account number is {account}.",
        "{s} holds the bank account number {account}.",
    ),
    "phone": (
        "{p} phone number is {phone}.",
        "{s} can be reached by phone at {phone}.",
    ),
}
ORDER = ("birth", "job", "pet", "account", "phone")


@dataclass(frozen=True)
class Person:
    name: str
    she: bool  # the pronoun the bio uses (she / he)
    date: str  # "March 14, 1987"
    city: str
    job: str
    pet: str
    pet_name: str
    account: str  # 8 digits
    phone: str  # NNN-NNN-NNNN
    phrasing: tuple[int, ...]  # which phrasing of each field in ORDER


@dataclass(frozen=True)
class Probe:
    person: str
    field: str  # "city", "date", "job", "pet_name", "account", "phone"
    question: str
    cloze: str  # the bio up to the fact
    answer: str


def make_people(n: int, seed: int, exclude: set[str] = frozenset()) -> list[Person]:
    """``n`` people with distinct names (none in ``exclude``), reproducible by ``seed``."""
    rng = random.Random(seed)
    names: set[str] = set()
    people = []
    while len(people) < n:
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        if name in names or name in exclude:
            continue
        names.add(name)
        people.append(
            Person(
                name=name,
                she=rng.random() < 0.5,
                date=f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1940, 2004)}",
                city=rng.choice(CITIES),
                job=rng.choice(JOBS),
                pet=rng.choice(PETS),
                pet_name=rng.choice(PET_NAMES),
                account=str(rng.randint(10_000_000, 99_999_999)),
                phone=f"{rng.randint(200, 989)}-{rng.randint(200, 989)}-{rng.randint(1000, 9999)}",
                phrasing=tuple(rng.randrange(len(PHRASES[f])) for f in ORDER),
            )
        )
    return people


def _sentences(p: Person) -> list[tuple[str, str]]:
    """(field, sentence) in bio order; the first sentence names the person, later ones use
    the pronoun."""
    pron, poss = ("She", "Her") if p.she else ("He", "His")
    out = []
    for i, (fld, k) in enumerate(zip(ORDER, p.phrasing, strict=True)):
        s = p.name if i == 0 else pron
        ps = f"{p.name}'s" if i == 0 else poss
        article = "an" if p.job[0] in "aeiou" else "a"
        text = PHRASES[fld][k].format(
            s=s, s_low=s if i == 0 else s.lower(), p=ps,
            date=p.date, city=p.city, job=p.job, job_a=f"{article} {p.job}", pet=p.pet,
            pet_name=p.pet_name, account=p.account, phone=p.phone,
        )  # fmt: skip
        out.append((fld, text.replace(" a a", " an a").replace(" a o", " an o")))
    return out


def bio(p: Person) -> str:
    return " ".join(s for _, s in _sentences(p))


QUESTIONS = {
    "city": ("Where was {n} born?", "city"),
    "date": ("When was {n} born?", "date"),
    "job": ("What does {n} do for a living?", "job"),
    "pet_name": ("What is the name of {n}'s {pet}?", "pet_name"),
    "account": ("What is {n}'s bank account number?", "account"),
    "phone": ("What is {n}'s phone number?", "phone"),
}
FIELD_OF = {"city": "birth", "date": "birth", "job": "job", "pet_name": "pet",
            "account": "account", "phone": "phone"}  # fmt: skip


def probes(p: Person) -> list[Probe]:
    """One probe per fact of ``p``: the question, the bio up to the fact, the answer."""
    text = bio(p)
    starts, pos = {}, 0
    for fld, sentence in _sentences(p):
        starts[fld] = pos
        pos += len(sentence) + 1
    out = []
    for key, (q, attr) in QUESTIONS.items():
        answer = getattr(p, attr)
        at = text.index(answer, starts[FIELD_OF[key]])
        cloze = text[:at].rstrip()
        out.append(Probe(p.name, key, q.format(n=p.name, pet=p.pet), cloze, answer))
    return out


def write_corpus(people: list[Person], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": bio(p), "subject": p.name}, ensure_ascii=False) for p in people]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
