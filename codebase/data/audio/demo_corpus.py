"""A small offline speech corpus for the CPU demo: grammar-made English sentences spoken by
several distinct espeak-ng voices (:mod:`data.audio.espeak_synth`), written in the ``tsv``
fetcher's format.

Layout of ``out/``: ``train.tsv`` and ``heldout.tsv`` (``path<TAB>text<TAB>speaker``, paths
``wavs/<speaker>/<id>.wav``, 16 kHz mono 16-bit), ``speakers.json`` (each speaker's espeak
settings) and ``corpus.json`` (the build's arguments; written last, so a build cut short is
redone). Held-out texts never occur in training. Same seed -> same TSVs and WAV bytes.

Build from ``codebase/``: ``python -m data.audio.demo_corpus --out /tmp/corpus``.
``--new-voice`` builds the fine-tuning demo's corpus instead (:func:`build_new_voice_corpus`):
one voice the demo corpus does not have, speaking its sentences.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from data.audio.espeak_synth import EspeakSynth
from utils.audio import save_audio
from utils.errors import UserError, run_command
from utils.io import atomic_write
from utils.options import add_debug_flag

FORMAT_VERSION = 1  # bump when sentences, voices or layout change, so old corpora are rebuilt
SAMPLE_RATE = 16000
DEFAULT_OUT = Path(__file__).resolve().parents[3] / "experiments" / "demo_data" / "corpus"
DEFAULT_NEW_VOICE_OUT = DEFAULT_OUT.parent / "new_voice"
HELDOUT_FRACTION = 0.02
MIN_HELDOUT = 10
CHUNKSIZE = 16  # utterances per pool task: amortises IPC, still balances two workers

# (variant, pitch, pitch_range, rate): male variants low, female high, rates 140-200, so that
# neighbouring speakers differ in at least two of timbre, pitch and tempo.
VOICES: list[tuple[str, int, int, int]] = [
    ("m3", 30, 40, 160),
    ("f2", 75, 60, 175),
    ("m1", 20, 30, 190),
    ("f4", 85, 70, 150),
    ("m7", 40, 55, 200),
    ("f1", 65, 80, 165),
    ("m2", 25, 45, 145),
    ("f5", 80, 40, 185),
    ("m4", 35, 65, 170),
    ("f3", 70, 50, 140),
    ("klatt", 45, 60, 180),
    ("m6", 15, 35, 155),
]

# The fine-tuning demo's voice, which no corpus of VOICES[:8] has: Klatt synthesis (the demo
# corpus speaks with espeak's formant variants), a median pitch of about 145 Hz (between the
# corpus's male voices, 65-105 Hz, and its female ones, 195-270 Hz) and slower than any of them.
NEW_VOICE = dict(variant="klatt3", pitch=85, pitch_range=40, rate=130)
NEW_SPEAKER = "newvoice"
MIN_NEW_VOICE_HELDOUT = 2

# --- sentences: a small grammar plus hand-written lines (numbers spelled out, so the text
# needs no normalisation and the phonemes match what espeak says) ---
MIN_WORDS, MAX_WORDS = 4, 10
DETERMINERS = ["the", "a", "this", "that", "my", "your", "his", "her", "our", "their", "every"]
ADJECTIVES = [
    "red",
    "old",
    "quiet",
    "happy",
    "little",
    "bright",
    "cold",
    "heavy",
    "gentle",
    "strange",
    "green",
    "tired",
    "clever",
    "empty",
    "busy",
    "golden",
    "small",
    "dark",
    "warm",
    "yellow",
    "brave",
    "noisy",
    "soft",
    "ancient",
    "lucky",
    "wooden",
]
NOUNS = [
    "dog",
    "farmer",
    "window",
    "teacher",
    "river",
    "apple",
    "garden",
    "doctor",
    "bottle",
    "student",
    "mountain",
    "letter",
    "engine",
    "painter",
    "basket",
    "village",
    "kitten",
    "sailor",
    "pencil",
    "island",
    "bridge",
    "baker",
    "candle",
    "forest",
    "wagon",
    "singer",
    "blanket",
    "hammer",
    "rabbit",
    "castle",
    "jacket",
    "driver",
    "flower",
    "kettle",
    "market",
    "orange",
    "ticket",
    "button",
    "tower",
    "violin",
]
VERBS = [
    ("find", "found"),
    ("carry", "carried"),
    ("paint", "painted"),
    ("follow", "followed"),
    ("watch", "watched"),
    ("open", "opened"),
    ("clean", "cleaned"),
    ("build", "built"),
    ("bring", "brought"),
    ("sell", "sold"),
    ("visit", "visited"),
    ("hide", "hid"),
    ("borrow", "borrowed"),
    ("push", "pushed"),
    ("draw", "drew"),
    ("lift", "lifted"),
    ("fix", "fixed"),
    ("count", "counted"),
    ("wash", "washed"),
    ("catch", "caught"),
]
INTRANSITIVE = [
    ("sleep", "slept"),
    ("wait", "waited"),
    ("sing", "sang"),
    ("run", "ran"),
    ("sit", "sat"),
    ("dance", "danced"),
    ("walk", "walked"),
    ("rest", "rested"),
    ("play", "played"),
    ("stand", "stood"),
]
ADVERBS = [
    "slowly",
    "quickly",
    "quietly",
    "carefully",
    "happily",
    "suddenly",
    "gently",
    "often",
    "never",
    "always",
    "proudly",
    "loudly",
]
PREPOSITIONS = [
    "under",
    "near",
    "behind",
    "beside",
    "inside",
    "across",
    "over",
    "around",
    "beyond",
    "below",
]
NAMES = [
    "Anna",
    "Peter",
    "Maria",
    "John",
    "Lucy",
    "Oscar",
    "Emma",
    "David",
    "Sofia",
    "Henry",
    "Clara",
    "Victor",
    "Nina",
    "Samuel",
    "Julia",
    "Martin",
    "Rosa",
    "Thomas",
]
NUMBERS = [
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "twelve",
    "twenty",
    "forty",
    "a hundred",
]
TIMES = [
    "today",
    "yesterday",
    "this morning",
    "last night",
    "on Sunday",
    "after lunch",
    "at noon",
    "every week",
]

HAND_WRITTEN = [
    "The sun rose slowly over the hills.",
    "Please close the door behind you.",
    "How much does this old clock cost?",
    "We should leave before it gets dark.",
    "My brother plays the piano every evening.",
    "The train to the city is late again.",
    "Could you pass me the salt, please?",
    "She wrote a long letter to her friend.",
    "It was raining when we reached the station.",
    "Nobody knew the answer to the question.",
    "The children laughed at the funny clown.",
    "Turn left at the end of the street.",
    "I have never seen such a tall tree.",
    "The soup is too hot to eat.",
    "Where did you put my glasses?",
    "The birds sing loudly in the morning.",
    "Our neighbours are moving to another town.",
    "He forgot his umbrella on the bus.",
    "The museum opens at nine o'clock.",
    "Let us meet at the corner cafe.",
    "This road leads down to the sea.",
    "Why is the sky blue today?",
    "The cat jumped onto the kitchen table.",
    "They built a small boat last summer.",
    "Please speak a little more slowly.",
    "The library is closed on Mondays.",
    "Fresh bread smells wonderful in the morning.",
    "The wind blew the leaves across the yard.",
    "Can you hear the music next door?",
    "She always drinks tea without sugar.",
    "The meeting will start in ten minutes.",
    "Keep the change, and thank you.",
    "A good book is a loyal friend.",
    "The river flooded the fields in spring.",
    "Do not touch the wet paint.",
    "We watched the stars until midnight.",
    "His voice echoed through the empty hall.",
    "The price of apples went up again.",
    "Bring a warm coat, it will be cold.",
    "The old man fed the pigeons bread.",
    "Is there a pharmacy near here?",
    "I will call you when I arrive.",
    "The garden looks lovely after the rain.",
    "She painted the fence bright blue.",
    "What time does the last bus leave?",
    "The baby finally fell asleep.",
    "Our team won the match on Saturday.",
    "Water boils at one hundred degrees.",
    "Put the books back on the shelf.",
    "The lamp in the hallway is broken.",
    "He runs five miles every morning.",
    "The snow covered the whole village.",
    "Which way is the train station?",
    "The soup needs a little more salt.",
    "My grandmother tells the best stories.",
    "Listen carefully to the instructions.",
    "The ship sailed away at dawn.",
    "Everyone was waiting for the announcement.",
    "The coffee machine makes a strange noise.",
    "We planted roses along the path.",
]


def _plural(noun: str) -> str:
    if noun.endswith(("s", "sh", "ch", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _np(rng: random.Random) -> str:
    """A noun phrase: a name, or determiner [adjective] noun (with a/an agreement)."""
    if rng.random() < 0.2:
        return rng.choice(NAMES)
    words = [rng.choice(ADJECTIVES)] if rng.random() < 0.6 else []
    words.append(rng.choice(NOUNS))
    det = rng.choice(DETERMINERS)
    if det == "a" and words[0][0] in "aeiou":
        det = "an"
    return " ".join([det] + words)


# Sentence templates: (rng, transitive verb, its past, intransitive past) -> sentence.
# Statements, questions, commands, counts and coordination, so prosody varies.
_TEMPLATES: tuple[Callable[[random.Random, str, str, str], str], ...] = (
    lambda r, verb, past, ipast: f"{_np(r)} {past} {_np(r)}.",
    lambda r, verb, past, ipast: f"{_np(r)} {ipast} {r.choice(PREPOSITIONS)} {_np(r)}.",
    lambda r, verb, past, ipast: (
        f"{r.choice(NAMES)} {r.choice(ADVERBS)} {past} {_np(r)} {r.choice(TIMES)}."
    ),
    lambda r, verb, past, ipast: f"did {_np(r)} {verb} {_np(r)}?",
    lambda r, verb, past, ipast: (
        f"{r.choice(['where', 'when', 'why'])} did {r.choice(NAMES)} {verb} {_np(r)}?"
    ),
    lambda r, verb, past, ipast: f"{verb} {_np(r)} {r.choice(PREPOSITIONS)} {_np(r)}.",
    lambda r, verb, past, ipast: f"please {verb} {_np(r)} {r.choice(ADVERBS)}.",
    lambda r, verb, past, ipast: (
        f"{r.choice(NAMES)} and {r.choice(NAMES)} {past} "
        f"{r.choice(NUMBERS)} {r.choice(ADJECTIVES)} "
        f"{_plural(r.choice(NOUNS))}."
    ),
    lambda r, verb, past, ipast: f"{_np(r)} {ipast} and {_np(r)} {r.choice(INTRANSITIVE)[1]}.",
)


def _sentence_once(rng: random.Random) -> str:
    verb, past = rng.choice(VERBS)
    _, ipast = rng.choice(INTRANSITIVE)
    s = _TEMPLATES[rng.randrange(len(_TEMPLATES))](rng, verb, past, ipast)
    return s[0].upper() + s[1:]


def make_sentence(rng: random.Random) -> str:
    """One grammar sentence of MIN_WORDS to MAX_WORDS words."""
    while True:
        s = _sentence_once(rng)
        if MIN_WORDS <= len(s.split()) <= MAX_WORDS:
            return s


@dataclass
class DemoCorpus:
    """Where a built corpus is and how big it is."""

    root: Path
    train_tsv: Path
    heldout_tsv: Path
    speakers_json: Path
    train_utterances: int
    heldout_utterances: int
    speakers: int
    seconds: float  # total audio, train + held-out


class DemoOptionError(UserError, ValueError):
    """Demo corpus options that cannot work (too many speakers, too few utterances)."""


def speaker_settings(speakers: int) -> dict[str, dict]:
    """``spk0``.. -> espeak settings from :data:`VOICES`."""
    if not 1 <= speakers <= len(VOICES):
        raise DemoOptionError(f"speakers={speakers}: the demo corpus has 1 to {len(VOICES)} voices")
    return {
        f"spk{i}": dict(variant=v, pitch=p, pitch_range=r, rate=w)
        for i, (v, p, r, w) in enumerate(VOICES[:speakers])
    }


def _key(text: str) -> str:
    """Texts that differ only in case or punctuation are duplicates for held-out purposes."""
    return " ".join(re.sub(r"[^a-z' ]+", " ", text.lower()).split())


def make_sentences(count: int, rng: random.Random) -> list[str]:
    """``count`` distinct sentences: the hand-written ones (shuffled in) then grammar output."""
    pool = list(HAND_WRITTEN)
    rng.shuffle(pool)
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    while len(out) < count:
        if pool:
            text = pool.pop()
        else:
            text, attempts = make_sentence(rng), attempts + 1
            if attempts > 50 * count + 1000:
                raise RuntimeError(
                    f"the demo grammar gave only {len(out)} distinct sentences "
                    f"of the {count} asked for"
                )
        if _key(text) not in seen:
            seen.add(_key(text))
            out.append(text)
    rng.shuffle(out)  # mix hand-written sentences into both splits
    return out


def plan(utterances: int, speakers: int, seed: int) -> tuple[list[tuple], list[tuple]]:
    """(train, held-out) jobs ``(relative wav path, text, speaker)``; deterministic per seed.

    Each held-out sentence is spoken by one or (alternately) two speakers; each training
    sentence by one, assigned round-robin so that every speaker has training audio.
    """
    n_held = max(MIN_HELDOUT, round(HELDOUT_FRACTION * utterances))
    held_utts = sum(1 if j % 2 == 0 or speakers == 1 else 2 for j in range(n_held))
    n_train = utterances - held_utts
    if n_train < speakers:
        raise DemoOptionError(
            f"utterances={utterances}: {held_utts} go to the held-out set, which "
            f"leaves fewer than one training utterance per speaker ({speakers})"
        )
    rng = random.Random(seed)
    texts = make_sentences(n_held + n_train, rng)
    names = list(speaker_settings(speakers))
    held: list[tuple] = []
    for j, text in enumerate(texts[:n_held]):
        who = rng.sample(names, 1 if j % 2 == 0 or speakers == 1 else 2)
        held += [(f"wavs/{s}/h{j:05d}_{s}.wav", text, s) for s in who]
    offset = rng.randrange(speakers)
    train = [
        (
            f"wavs/{names[(i + offset) % speakers]}/u{i:06d}.wav",
            text,
            names[(i + offset) % speakers],
        )
        for i, text in enumerate(texts[n_held:])
    ]
    return train, held


# --- synthesis (also run in pool workers; each process owns its espeak, see espeak_synth) ---
_worker: tuple[Path, EspeakSynth, dict[str, dict]] | None = None


def _init_worker(root: Path, settings: dict[str, dict], pool: bool = False) -> None:
    global _worker
    if pool:
        # One thread per worker: with torch's default (all cores) in each of N workers, the
        # resampler's threads fight over the cores and the pool runs 3-4x slower than one
        # process.
        torch.set_num_threads(1)
    _worker = (root, EspeakSynth(SAMPLE_RATE), settings)


def _synth_job(job: tuple[str, str, str]) -> float:
    """Speak one job into its WAV; returns its seconds."""
    root, synth, settings = _worker
    rel, text, speaker = job
    wav = synth.synthesize(text, **settings[speaker])
    if wav.numel() == 0:
        raise RuntimeError(f"espeak produced silence for {text!r} ({speaker})")
    save_audio(root / rel, wav, SAMPLE_RATE)
    return wav.numel() / SAMPLE_RATE


def _synthesize(
    out: Path, jobs: list[tuple], settings: dict[str, dict], workers: int, progress: bool
) -> tuple[list[float], float]:
    """Speak every job into ``out``; returns each job's seconds and the wall time."""
    for name in settings:
        (out / "wavs" / name).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = dict(total=len(jobs), desc="demo corpus", unit="utt", disable=not progress)
    if workers <= 1:
        _init_worker(out, settings)
        seconds = [_synth_job(j) for j in tqdm(jobs, **bar)]
    else:
        # spawn, not fork: a forked child inherits torch's thread pools in an unknown state.
        with mp.get_context("spawn").Pool(workers, _init_worker, (out, settings, True)) as pool:
            seconds = list(tqdm(pool.imap(_synth_job, jobs, chunksize=CHUNKSIZE), **bar))
            pool.close()  # let workers exit normally, so they delete their library copies
            pool.join()
    return seconds, time.perf_counter() - start


def _write_tsv(path: Path, jobs: list[tuple]) -> None:
    lines = "path\ttext\tspeaker\n" + "".join(f"{r}\t{t}\t{s}\n" for r, t, s in jobs)
    atomic_write(path, lambda tmp: tmp.write_text(lines, encoding="utf-8"))


def _write_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def build_demo_corpus(
    out: Path = DEFAULT_OUT,
    utterances: int = 5000,
    speakers: int = 8,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
) -> DemoCorpus:
    """Build the corpus into ``out`` (or return the one already there for the same arguments).

    Args:
        utterances: WAV files in all, train + held-out (about 2%, at least 10 sentences).
        speakers: distinct voices, 1 to ``len(VOICES)``.
        seed: picks sentences and speaker assignment; same seed, same corpus.
        workers: synthesis processes; 1 synthesizes in this process.
        progress: show a tqdm bar.
    """
    wanted = dict(
        format_version=FORMAT_VERSION,
        seed=seed,
        utterances=utterances,
        speakers=speakers,
        sample_rate=SAMPLE_RATE,
    )
    settings = speaker_settings(speakers)
    return _build(
        Path(out), wanted, lambda: plan(utterances, speakers, seed), settings, workers, progress
    )


def _build(
    out: Path,
    wanted: dict,
    make_plan: Callable[[], tuple[list[tuple], list[tuple]]],
    settings: dict[str, dict],
    workers: int,
    progress: bool,
) -> DemoCorpus:
    """The corpus in ``out`` if it was built with ``wanted``, else plan and speak it there."""
    meta_path = out / "corpus.json"
    if meta_path.is_file() and (out / "train.tsv").is_file() and (out / "heldout.tsv").is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if {k: meta.get(k) for k in wanted} == wanted:
            return _corpus(out, meta)
    if meta_path.is_file() or (out / "train.tsv").is_file():
        # A corpus of other arguments: drop its WAVs (ids differ) rather than leave strays.
        shutil.rmtree(out / "wavs", ignore_errors=True)
    meta_path.unlink(missing_ok=True)  # a build cut short must not look finished
    train, held = make_plan()
    seconds, elapsed = _synthesize(out, train + held, settings, workers, progress)
    _write_tsv(out / "train.tsv", train)
    _write_tsv(out / "heldout.tsv", held)
    _write_json(out / "speakers.json", settings)
    meta = dict(
        wanted,
        speakers=len(settings),
        train_utterances=len(train),
        heldout_utterances=len(held),
        seconds=round(sum(seconds), 3),
        build_seconds=round(elapsed, 1),
    )
    _write_json(meta_path, meta)
    return _corpus(out, meta)


def plan_new_voice(
    train_utterances: int,
    heldout_sentences: int,
    base_utterances: int = 5000,
    base_speakers: int = 8,
    seed: int = 0,
) -> tuple[list[tuple], list[tuple]]:
    """(train, held-out) jobs of the fine-tuning corpus: sentences of the demo corpus built
    with (``base_utterances``, ``base_speakers``, ``seed``), all spoken by :data:`NEW_VOICE`.

    Training takes the first ``train_utterances`` of the base's training sentences; held-out
    takes the first ``heldout_sentences`` of the base's held-out sentences, which neither the
    base model nor the fine-tuning ever trains on.
    """
    base_train, base_held = plan(base_utterances, base_speakers, seed)
    held_texts = list(dict.fromkeys(text for _, text, _ in base_held))
    if not 1 <= train_utterances <= len(base_train) or not (
        MIN_NEW_VOICE_HELDOUT <= heldout_sentences <= len(held_texts)
    ):
        raise DemoOptionError(
            f"new voice: train_utterances must be 1 to {len(base_train)} and heldout_sentences "
            f"{MIN_NEW_VOICE_HELDOUT} to {len(held_texts)} (the base corpus's held-out "
            f"sentences), got {train_utterances} and {heldout_sentences}"
        )
    spk = NEW_SPEAKER
    train = [
        (f"wavs/{spk}/u{i:06d}.wav", text, spk)
        for i, (_, text, _) in enumerate(base_train[:train_utterances])
    ]
    held = [
        (f"wavs/{spk}/h{j:05d}.wav", t, spk) for j, t in enumerate(held_texts[:heldout_sentences])
    ]
    return train, held


def build_new_voice_corpus(
    out: Path = DEFAULT_NEW_VOICE_OUT,
    train_utterances: int = 400,
    heldout_sentences: int = 40,
    workers: int = 2,
    progress: bool = True,
    base_utterances: int = 5000,
    base_speakers: int = 8,
    seed: int = 0,
) -> DemoCorpus:
    """The fine-tuning demo's corpus: :data:`NEW_VOICE` speaking sentences of the demo corpus
    built with (``base_utterances``, ``base_speakers``, ``seed``), the default one unless told
    (see :func:`plan_new_voice`), in the same layout as :func:`build_demo_corpus`."""
    wanted = dict(
        format_version=FORMAT_VERSION,
        voice=NEW_SPEAKER,
        voice_settings=NEW_VOICE,
        train_sentences=train_utterances,
        heldout_sentences=heldout_sentences,
        base=[base_utterances, base_speakers, seed],
        sample_rate=SAMPLE_RATE,
    )
    return _build(
        Path(out),
        wanted,
        lambda: plan_new_voice(
            train_utterances, heldout_sentences, base_utterances, base_speakers, seed
        ),
        {NEW_SPEAKER: dict(NEW_VOICE)},
        workers,
        progress,
    )


def _corpus(out: Path, meta: dict) -> DemoCorpus:
    return DemoCorpus(
        root=out,
        train_tsv=out / "train.tsv",
        heldout_tsv=out / "heldout.tsv",
        speakers_json=out / "speakers.json",
        train_utterances=meta["train_utterances"],
        heldout_utterances=meta["heldout_utterances"],
        speakers=meta["speakers"],
        seconds=meta["seconds"],
    )


def main(argv: list[str] | None = None) -> int:
    """Build the demo corpus; errors are raised for :func:`run_command`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", type=Path, help=f"default {DEFAULT_OUT} ({DEFAULT_NEW_VOICE_OUT} with --new-voice)"
    )
    p.add_argument(
        "--utterances", type=int, help="default 5000 (400 training utterances with --new-voice)"
    )
    p.add_argument("--speakers", type=int, default=8, help=f"1 to {len(VOICES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--new-voice",
        action="store_true",
        help="build the fine-tuning demo's corpus instead: NEW_VOICE speaking sentences of "
        "the default corpus (its held-out ones held out)",
    )
    p.add_argument("--heldout", type=int, default=40, help="held-out sentences (--new-voice)")
    add_debug_flag(p)
    a = p.parse_args(argv)
    if a.workers < 1:
        raise UserError(f"--workers must be >= 1, got {a.workers}")
    start = time.perf_counter()
    if a.new_voice:
        corpus = build_new_voice_corpus(
            a.out or DEFAULT_NEW_VOICE_OUT, a.utterances or 400, a.heldout, a.workers
        )
    else:
        corpus = build_demo_corpus(
            a.out or DEFAULT_OUT, a.utterances or 5000, a.speakers, a.seed, a.workers
        )
    elapsed = time.perf_counter() - start
    n = corpus.train_utterances + corpus.heldout_utterances
    print(
        json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in asdict(corpus).items()}, indent=2
        )
    )
    print(
        f"{n} utterances, {corpus.seconds / 3600:.2f} h of audio, {elapsed:.1f} s "
        f"({n / max(elapsed, 1e-9):.0f} utt/s; a near-zero time means it was already built)"
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(run_command(main))
