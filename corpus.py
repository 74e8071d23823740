"""
The pre-training data of train_mlm.py: the tokenizers, each corpus tokenized once into memory-mapped
token files, and the sequences and masked batches drawn from them.

    python train_mlm.py --prepare-only --data corpus/ --spm sentencepiece.bpe.model --workers 16
    python train_mlm.py --data /read-only/corpus --prepared /scratch/corpus-prepared

    corpus = open_corpus(prepare_corpus("corpus", "corpus/prepared", ByteTokenizer()), "corpus/prepared", "corpus")
    inp, labels = global_batch(step, seed, G, L, q, corpus, tok)   # (G, L) each, a function of (seed, step)

A corpus is a folder of UTF-8 text files, one per language (<lang>.txt, one sentence or document a
line). Preparing it streams each file in chunks (in several processes where cores allow) and writes,
into the prepared folder (default DATA/prepared): <lang>.bin, the token ids of its non-blank lines
one after the other (uint16, or uint32 for a vocabulary over 65,536, such as XLM-R's 250,002);
<lang>.idx, int64, where each line starts, then the end; and manifest.json, with the format, the
tokenizer and the size and modification time of each source. A changed source or another tokenizer
is prepared again. Training opens the files with np.memmap (nanoGPT's prepare.py, llm.c's shards),
so its start-up and memory do not grow with the corpus.
"""

import bisect
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from runtime import BadInput, atomic, locked, print0, together, write_atomic
from synthetic import make_synthetic


SYNTHETIC_DIR = Path("data/synthetic")  # the built-in corpus: the synthetic world, written on first use


# ------------------------------------------------------------------------------------------------
# Tokenizers. Both put <s>, </s>, <pad> and <mask> below id 4 (and <mask> last for SentencePiece),
# so "special" is `id < 4 or id == mask` and random replacements come from [4, random_hi).

class ByteTokenizer:
    """UTF-8 bytes: <pad>=0 <s>=1 </s>=2 <mask>=3, byte b -> 4 + b. Every language, no files."""
    pad, bos, eos, mask, vocab_size, random_hi = 0, 1, 2, 3, 260, 260
    unk = mask  # no byte is unknown; <mask>, "a token we do not see", stands in where a word has no byte
    spec = {"kind": "byte"}

    def encode(self, text):
        return [b + 4 for b in text.encode("utf-8")]

    def encode_lines(self, lines):
        """lines: UTF-8 bytes -> (the ids of all lines back to back, the length of each line)."""
        ids = np.frombuffer(b"".join(lines), dtype=np.uint8).astype(np.int64) + 4
        return ids, np.array([len(s) for s in lines], dtype=np.int64)


class SentencePieceTokenizer:
    """XLM-R's (fairseq's) layout: <s>=0 <pad>=1 </s>=2 <unk>=3, SentencePiece piece i>=3 -> i+1,
    <mask> last; XLM-R's sentencepiece.bpe.model (250000 pieces) gives vocab_size 250002, as in `base`."""

    def __init__(self, path):
        try:
            import sentencepiece
        except ImportError:
            raise BadInput("--spm needs the sentencepiece package: pip install sentencepiece") from None
        if not Path(path).is_file():
            raise BadInput(f"--spm {path}: no such file")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise BadInput(f"--spm {path} is not a SentencePiece model ({e})") from None
        n = self.sp.get_piece_size()
        self.bos, self.pad, self.eos, self.unk, self.mask = 0, 1, 2, 3, n + 1
        self.vocab_size, self.random_hi, self.spec = n + 2, n + 1, {"kind": "spm", "path": str(path)}

    def encode(self, text):
        return [self.unk if i == 0 else i + 1 for i in self.sp.encode(text)]

    def encode_lines(self, lines):
        pieces = self.sp.encode([s.decode("utf-8") for s in lines])
        ids = np.fromiter((i for p in pieces for i in p), dtype=np.int64)
        return np.where(ids == 0, self.unk, ids + 1), np.array([len(p) for p in pieces], dtype=np.int64)


def make_tokenizer(spec):
    """The tokenizer a checkpoint records: {"kind": "byte"} or {"kind": "spm", "path": ...}."""
    return SentencePieceTokenizer(spec["path"]) if spec["kind"] == "spm" else ByteTokenizer()


def is_special(ids, tok):
    return (ids < 4) | (ids == tok.mask)


# ------------------------------------------------------------------------------------------------
# Preparation: each <lang>.txt into <lang>.bin and <lang>.idx, once. The last lines of each language,
# holding at most min(VAL_TOKENS, a tenth of its tokens), are its validation split.

FORMAT = 1  # of the prepared files; another value means: prepare again
VAL_TOKENS = 8192  # tokens (with <s> and </s>) held out of each language, at most
CHUNK_BYTES = 16 << 20  # text a preparation task tokenizes at once: memory stays bounded


class Corpus(NamedTuple):
    langs: list  # language codes, from the file names
    tokens: list  # per language, np.memmap of the token ids of every line, back to back
    starts: list  # per language, np.memmap (lines + 1,) int64: where each line starts, then the end
    n_train: np.ndarray  # (languages,) lines for training: the first ones; the rest is validation
    n_tokens: np.ndarray  # (languages,) n_i: training tokens with <s> and </s>, what q_i is computed from


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def tokenizer_identity(tok):
    """What the prepared ids depend on: bytes, or the SentencePiece model's content (not its path)."""
    if tok.spec["kind"] == "byte":
        return {"kind": "byte"}
    return {"kind": "spm", "sha256": hashlib.sha256(Path(tok.spec["path"]).read_bytes()).hexdigest()}


def chunks(path):
    """(path, start, end): byte ranges of about CHUNK_BYTES that end at a line break."""
    size, out, start = path.stat().st_size, [], 0
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + CHUNK_BYTES, size))
            f.readline()
            out.append((path, start, f.tell()))
            start = f.tell()
    return out


_worker_tokenizer = None


def tokenize_chunk(task, tok=None):
    """One chunk -> (ids, line lengths), or (None, byte offset, reason) where it is not UTF-8. A worker
    process gets the tokenizer's spec in the task and makes the tokenizer once."""
    global _worker_tokenizer
    path, start, end = task[:3]
    if tok is None:
        _worker_tokenizer = _worker_tokenizer or make_tokenizer(task[3])
        tok = _worker_tokenizer
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, start + e.start, e.reason
    ids, lengths = tok.encode_lines([s for s in (s.strip() for s in raw.split(b"\n")) if s])
    return ids.astype(token_dtype(tok.vocab_size)), lengths


def prepare_language(source, prefix, tok, pool, bar):
    """One <lang>.txt into prefix.bin and prefix.idx (each written aside, then renamed)."""
    tasks = chunks(source)
    results = pool.imap(tokenize_chunk, [(*t, tok.spec) for t in tasks]) if pool else \
        (tokenize_chunk(t, tok) for t in tasks)
    lengths = [np.zeros(1, np.int64)]
    with atomic(f"{prefix}.bin") as tmp:
        with open(tmp, "wb") as out:
            for (_, start, end), (ids, *rest) in zip(tasks, results):
                if ids is None:
                    raise BadInput(f"{source}, line {line_of(source, rest[0])}: not UTF-8 ({rest[1]} at byte "
                                   f"{rest[0]}); convert the file to UTF-8 (e.g. iconv -t UTF-8) or remove the line")
                ids.tofile(out)
                lengths.append(rest[0])
                bar.update(end - start)
        starts = np.cumsum(np.concatenate(lengths))  # (lines + 1,) where each line starts, then the end
        with atomic(f"{prefix}.idx") as idx:
            starts.tofile(idx)
    return {"tokens": int(starts[-1]), "lines": len(starts) - 1}


def line_of(path, offset):
    """The line number of byte `offset`, counted block by block (never the whole file in memory)."""
    with open(path, "rb") as f:
        return 1 + sum(f.read(min(CHUNK_BYTES, offset - pos)).count(b"\n") for pos in range(0, offset, CHUNK_BYTES))


def prepare_corpus(data_dir, prepared, tok, workers=1):
    """Bring the prepared folder up to date with DIR/<lang>.txt and return its manifest. A changed
    source, or another tokenizer, is prepared again, and said so. The manifest is rewritten after each
    language: a killed preparation leaves no entry that looks complete. Processes started together
    take turns (a lock beside the folder), so none opens a corpus with fewer languages. Nothing is
    written when everything is up to date (a prepared corpus may be read-only). workers > 1 start with
    multiprocessing's spawn, which imports the main script again: call it under __main__."""
    data_dir, prepared = Path(data_dir), Path(prepared)
    if not data_dir.is_dir():
        raise BadInput(f"--data {data_dir}: no such folder; it should hold one <lang>.txt file per language")
    sources = sorted(data_dir.glob("*.txt"))
    if not sources:
        raise BadInput(f"--data {data_dir} has no <lang>.txt files; put one UTF-8 text file per language there")
    manifest, stale = plan(prepared, sources, tok, say=False)
    if stale is not None:
        writable(prepared)
        with locked(prepared.with_name(prepared.name + ".lock")):
            manifest, stale = plan(prepared, sources, tok, say=True)  # as another process may have left it
            if stale is not None:
                update(manifest, prepared, stale, {src.stem for src in sources}, tok, workers)
    for lang, entry in manifest["languages"].items():
        if entry["lines"] == 0:
            tqdm.write(f"warning: {data_dir / lang}.txt has no text; language {lang!r} skipped")
    return manifest


def plan(prepared, sources, tok, say):
    """-> (the manifest, {source: its stat} to prepare, or None when the manifest is up to date)."""
    want = {"format": FORMAT, "tokenizer": tokenizer_identity(tok), "dtype": np.dtype(token_dtype(tok.vocab_size)).name}
    manifest = read_manifest(prepared)
    if manifest is not None and {k: manifest.get(k) for k in want} != want:
        if say:
            tqdm.write(f"{prepared} was prepared with another tokenizer or format; preparing again")
        manifest = None
    manifest = manifest or {**want, "languages": {}}
    stale = {}
    for src in sources:
        stat, entry = src.stat(), manifest["languages"].get(src.stem)
        if entry is None or (entry["size"], entry["mtime_ns"]) != (stat.st_size, stat.st_mtime_ns):
            stale[src] = stat
            if entry is not None and say:
                tqdm.write(f"{src} changed since it was prepared; preparing it again")
    same = not stale and set(manifest["languages"]) == {src.stem for src in sources}
    return manifest, None if same else stale


def writable(prepared):
    try:
        prepared.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=prepared).close()
    except OSError as e:
        raise BadInput(f"cannot write the prepared token files to {prepared} ({e.strerror or e}); give a "
                       "folder you can write with --prepared DIR") from None


def update(manifest, prepared, stale, langs, tok, workers):
    manifest["languages"] = {k: v for k, v in manifest["languages"].items() if k in langs}
    several = workers > 1 and sum(s.st_size for s in stale.values()) > CHUNK_BYTES
    with (multiprocessing.get_context("spawn").Pool(workers) if several else nullcontext()) as pool, \
            tqdm(total=sum(s.st_size for s in stale.values()), unit="B", unit_scale=True, unit_divisor=1024,
                 desc=f"preparing {prepared}", dynamic_ncols=True) as bar:
        for src, stat in stale.items():
            manifest["languages"].pop(src.stem, None)
            write_atomic(prepared / "manifest.json", json.dumps(manifest, indent=1))
            entry = prepare_language(src, prepared / src.stem, tok, pool, bar)
            manifest["languages"][src.stem] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **entry}
    write_atomic(prepared / "manifest.json", json.dumps(manifest, indent=1))


def load_corpus(data, prepared, tok, rt, workers=1, prepare_only=False):
    """--data (default: the synthetic world's mlm/) prepared into --prepared (default DATA/prepared) by
    process 0 of each machine while the others wait, then memory-mapped. -> Corpus (None: prepare_only)."""
    data_dir = Path(data) if data else SYNTHETIC_DIR / "mlm"
    prepared = Path(prepared) if prepared else data_dir / "prepared"
    with together(rt):  # the others wait here; bad data on one machine stops every process
        if rt.local_rank == 0:
            prepare_corpus(data_dir if data else synthetic_corpus(), prepared, tok, workers)
    if prepare_only:
        return print0(f"prepared {data_dir} in {prepared}")
    corpus = open_corpus(read_manifest(prepared), prepared, data_dir)
    if (corpus.n_train == [len(s) - 1 for s in corpus.starts]).all():
        raise BadInput(f"--data {data_dir}: too little text to hold out a validation split; a language "
                       "needs at least two lines")
    return corpus


def read_manifest(prepared):
    path = Path(prepared) / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise BadInput(f"{path} is corrupt; delete {prepared} (or the file) and run again") from None


def open_corpus(manifest, prepared, data_dir):
    """The prepared files as memory maps; a file of the wrong size is a clear error, not a crash."""
    dtype, prepared = np.dtype(manifest["dtype"]), Path(prepared)
    langs, tokens, starts = [], [], []
    for lang, entry in sorted(manifest["languages"].items()):
        if entry["lines"] == 0:  # prepare_corpus warned about it
            continue
        files = [(prepared / f"{lang}.bin", dtype, entry["tokens"]),
                 (prepared / f"{lang}.idx", np.int64, entry["lines"] + 1)]
        for path, dt, n in files:
            size = path.stat().st_size if path.exists() else 0
            if size != n * np.dtype(dt).itemsize:
                raise BadInput(f"{path} is corrupt or incomplete ({size} bytes, expected {n * np.dtype(dt).itemsize}); "
                               f"delete {prepared / 'manifest.json'} and run again: the corpus is then prepared again")
        langs.append(lang)
        tokens.append(np.memmap(files[0][0], dtype=dtype, mode="r", shape=(entry["tokens"],)))
        starts.append(np.memmap(files[1][0], dtype=np.int64, mode="r", shape=(entry["lines"] + 1,)))
    if not langs:
        raise BadInput(f"--data {data_dir}: every <lang>.txt file is empty; the corpus has no text")
    n_train = np.array([first_validation_line(s) for s in starts])
    n_tokens = np.array([s[k] - s[0] + 2 * k for s, k in zip(starts, n_train)], dtype=np.float64)
    return Corpus(langs, tokens, starts, n_train, n_tokens)


def first_validation_line(starts):
    """The validation split of a language: its last lines that hold at most min(VAL_TOKENS, a tenth of
    its tokens) tokens with <s> and </s>, at least one line and never all. Binary search: the line
    index is read at O(log lines) places, not whole."""
    lines = len(starts) - 1
    budget = min(VAL_TOKENS, (int(starts[-1] - starts[0]) + 2 * lines) // 10)
    after = lambda i: int(starts[-1] - starts[i]) + 2 * (lines - i) <= budget  # lines i.. fit the budget
    first = bisect.bisect_left(range(lines), True, key=after)
    return min(max(first, 1), lines - 1) if lines > 1 else lines


def synthetic_corpus(path=SYNTHETIC_DIR):
    """The built-in corpus: the synthetic world, written once into a temporary folder, then renamed, by
    the first of the processes started together (a lock); a run killed half-way leaves nothing that
    looks finished (nor does a world written before its tasks declared their languages). -> its mlm/."""
    done = lambda: any((path / "mlm").glob("*.txt")) and (path / "udpos" / "languages.json").exists()
    if not done():
        with locked(path.with_name(path.name + ".lock")):
            if not done():
                tqdm.write(f"generating the synthetic multilingual world into {path} (once)")
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                make_synthetic(tmp, seed=0)
                shutil.rmtree(path, ignore_errors=True)
                os.replace(tmp, path)
    return path / "mlm"


# ------------------------------------------------------------------------------------------------
# Sequences and batches: language sampling q_i ~ n_i^alpha, BERT masking; global batch = f(seed, step)

MASK_PROB, MASK_TOKEN, MASK_RANDOM = 0.15, 0.8, 0.1  # BERT: 15% of tokens; 80% <mask>, 10% random, 10% kept


def sequence(tokens, starts, line, offset, end_line, L, tok):
    """<s> line </s> <s> line </s> ... from token `offset` of line `line`: whole lines while they fit in
    L tokens, then padding; a line longer than L - 2 tokens gives pieces of L - 2. Lines from end_line
    on are not used. -> (row (L,), the line and offset where the next sequence starts).

    Lines a b c | d e f g | h i and L = 14 give <s> a b c </s> <s> d e f g </s> <pad> x 3: the third
    line would need 4 more tokens; the next sequence starts with it."""
    first = starts[line] + offset
    # where each following line ends, from `first`; at most L // 3 lines fit (<s>, a token, </s>)
    ends = np.asarray(starts[line + 1:min(end_line, line + L // 3) + 1]) - first
    k = int(np.searchsorted(ends + 2 * np.arange(1, len(ends) + 1), L, side="right"))  # whole lines that fit
    row = np.full(L, tok.pad, dtype=np.int64)
    if k == 0:  # a piece of a long line
        row[0], row[1:L - 1], row[L - 1] = tok.bos, tokens[first:first + L - 2], tok.eos
        return row, line, offset + L - 2
    pos = 0
    for a, b in zip([0, *ends[:k - 1]], ends[:k]):  # line j: tokens a:b after `first`
        row[pos], row[pos + 1:pos + 1 + b - a], row[pos + 1 + b - a] = tok.bos, tokens[first + a:first + b], tok.eos
        pos += b - a + 2
    return row, line + k, 0


def validation_rows(corpus, L, tok):
    """Each language's held-out lines, packed in order, VAL_TOKENS at most (a held-out line can be a
    long document). -> (rows (V, L), language of each row (V,))."""
    rows, lang = [], []
    for i, (tokens, starts) in enumerate(zip(corpus.tokens, corpus.starts)):
        line, offset, end = int(corpus.n_train[i]), 0, len(starts) - 1
        for _ in range(-(-VAL_TOKENS // L)):
            if line >= end:
                break
            row, line, offset = sequence(tokens, starts, line, offset, end, L, tok)
            rows.append(row)
            lang.append(i)
    return np.stack(rows), np.array(lang)


def sampling_probs(n_tokens, alpha):
    """Language re-balanced sampling, q_i = n_i^alpha / sum_j n_j^alpha (Conneau and Lample 2019)."""
    w = np.asarray(n_tokens, dtype=np.float64) ** alpha
    return w / w.sum()


def bert_mask(ids, rng, tok):
    """BERT masking: 15% of the non-special tokens are predicted; of those 80% become <mask>, 10% a
    random ordinary token (never a special) and 10% stay. -> (input ids, labels: -100 elsewhere)."""
    selected = (rng.random(ids.shape) < MASK_PROB) & ~is_special(ids, tok)
    action = rng.random(ids.shape)
    random_ids = rng.integers(4, tok.random_hi, ids.shape)
    inp = np.where(selected & (action < MASK_TOKEN), tok.mask, ids)
    inp = np.where(selected & (action >= MASK_TOKEN) & (action < MASK_TOKEN + MASK_RANDOM), random_ids, inp)
    return inp, np.where(selected, ids, -100)


def global_batch(step, seed, G, L, q, corpus, tok):
    """The G sequences and masks of optimizer step `step`: a function of (seed, step) alone, the same on
    every process whatever their number. Each sequence: a language ~ q, a training token of it chosen
    uniformly, and the sequence that starts with its line (or with its piece of a long line).
    -> (input ids, labels), each (G, L) int64."""
    rng = np.random.default_rng([seed, step])
    langs = rng.choice(len(q), size=G, p=q)
    picks = rng.random(G)
    rows = []
    for i, u in zip(langs, picks):
        tokens, starts, n = corpus.tokens[i], corpus.starts[i], int(corpus.n_train[i])
        t = starts[0] + int(u * (starts[n] - starts[0]))  # a training token (line markers aside)
        line = int(np.searchsorted(starts[:n + 1], t, side="right")) - 1
        offset = (t - starts[line]) // (L - 2) * (L - 2)  # the piece it is in (0 unless the line is long)
        rows.append(sequence(tokens, starts, line, offset, n, L, tok)[0])
    return bert_mask(np.stack(rows), rng, tok)


def unigram_entropy(ids, tok):
    """Entropy (nats) of the unigram distribution of the maskable tokens: the MLM loss of the best
    predictor that ignores the context, in the same units as the loss."""
    counts = np.bincount(ids[~is_special(ids, tok)].ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
