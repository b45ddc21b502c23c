"""FusionRoute's selection head, in NumPy: a linear layer on the router's last hidden state picks the expert that
writes the next token (``argmax(W·h + b)``), and ``beta`` weighs the router's own log-probabilities added to the
chosen expert's (``log π_I + β·log π_router``; β = 0 is pure routing). See ../shared/research/eager-fusionroute.md.

This module holds no model: the head as a file (:class:`RouterHead`, :func:`load_head`), its fit (a multinomial
logistic regression with L2 and early stopping, :func:`fit_head`) and the fit of β (:func:`fit_beta`). Files are
written byte for byte the same for the same inputs (:func:`write_npz`: a zip without timestamps), atomically.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import HeadFileError
from .hashing import sha256_file

FORMAT = "edge-ensemble-route-head"
FORMAT_VERSION = 1
TRAIN_HINT = "run `edge-ensemble route train` for these models"
# β values the fit tries (0 first: a tie keeps the smaller weight).
BETA_GRID: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)


# -- deterministic .npz files -----------------------------------------------------------------------------------


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as an .npz (readable by ``np.load``) that depends on nothing but the arrays: members in
    the given order, a fixed timestamp (``np.savez`` stamps the current time), through a temp file renamed
    into place, so a reader never sees half a file."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def text_array(data: object) -> np.ndarray:
    """JSON of ``data`` as a 0-d unicode array (an .npz member that needs no pickle)."""
    return np.array(json.dumps(data, sort_keys=True, ensure_ascii=False))


# -- the head ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterHead:
    """The selection head and what it was made for.

    ``W`` (experts x hidden) and ``b`` score the experts from the router's last hidden state; ``beta`` is the
    fitted complementary weight. The sha256 of the router's and every expert's GGUF file bind the head to
    those exact models."""

    W: np.ndarray
    b: np.ndarray
    beta: float
    router_sha256: str
    expert_sha256: tuple[str, ...]
    expert_names: tuple[str, ...]
    router_name: str = ""
    router_spec: str = ""  # how the router was named at training (catalog key or path): a hint in errors
    hidden_size: int = 0
    training_data: str = ""
    date: str = ""
    seed: int = 0
    heldout_accuracy: float | None = None
    extra: dict = field(default_factory=dict)  # the training report's figures

    @property
    def n_experts(self) -> int:
        return int(self.W.shape[0])

    def scores(self, hidden: np.ndarray) -> np.ndarray:
        """The experts' scores w = W·h + b for one hidden state (or a batch of them, one a row)."""
        return np.asarray(hidden, dtype=np.float32) @ self.W.T + self.b

    def select(self, hidden: np.ndarray) -> int:
        """The expert for one hidden state: argmax of the scores (the first on a tie)."""
        return int(np.argmax(self.scores(hidden)))

    def meta(self) -> dict:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "beta": float(self.beta),
            "router_sha256": self.router_sha256, "expert_sha256": list(self.expert_sha256),
            "expert_names": list(self.expert_names), "router_name": self.router_name,
            "router_spec": self.router_spec, "hidden_size": int(self.hidden_size),
            "training_data": self.training_data, "date": self.date, "seed": int(self.seed),
            "heldout_accuracy": self.heldout_accuracy, "extra": self.extra,
        }

    def save(self, path: Path) -> None:
        """Write the head as an .npz (W, b, meta), atomically; the same head gives the same bytes."""
        write_npz(Path(path), {"W": self.W.astype(np.float32), "b": self.b.astype(np.float32),
                               "meta": text_array(self.meta())})

    # -- binding to models ---------------------------------------------------------------------------------------

    def roles(self, shas: Sequence[str], names: Sequence[str], where: str = "the head") -> tuple[int, list[int]]:
        """Which of the loaded models (their GGUF sha256 and names, in member order) is the router and which is
        each expert, in the head's expert order; one line naming the model that is missing otherwise."""
        def find(sha: str) -> int | None:
            return next((i for i, s in enumerate(shas) if s == sha), None)

        experts = []
        for sha, name in zip(self.expert_sha256, self.expert_names):
            i = find(sha)
            if i is None:
                raise HeadFileError(
                    f"{where} was trained for expert {name} (sha256 {sha[:12]}…), which is not among the models"
                    f" given ({_listing(names, shas)}); give the models it was trained for, or {TRAIN_HINT}")
            experts.append(i)
        router = find(self.router_sha256)
        if router is None:
            hint = f" (add it: -m {self.router_spec})" if self.router_spec else ""
            raise HeadFileError(
                f"{where} was trained for router {self.router_name or 'model'} (sha256 {self.router_sha256[:12]}…),"
                f" which is not among the models given ({_listing(names, shas)}){hint}; or {TRAIN_HINT}")
        return router, experts

    def check_hidden_size(self, n_embd: int, router: str, where: str = "the head") -> None:
        if n_embd != self.hidden_size:
            raise HeadFileError(f"{where} reads hidden states of size {self.hidden_size}, but router {router} has"
                                f" {n_embd}; {TRAIN_HINT}")


def _listing(names: Sequence[str], shas: Sequence[str]) -> str:
    return ", ".join(f"{n} sha256 {s[:12]}…" for n, s in zip(names, shas))


def load_head(path: str | os.PathLike[str], *, router_sha: str | None = None,
              expert_shas: Sequence[str] | None = None, hidden_size: int | None = None) -> RouterHead:
    """Read and check a head file; with ``router_sha`` / ``expert_shas`` / ``hidden_size`` also check that it was
    made for those models. Every problem is one :class:`HeadFileError` line naming it and the fix."""
    path = Path(path).expanduser()
    where = f"route head {path}"
    if not path.exists():
        raise HeadFileError(f"{where} not found; train one with `edge-ensemble route train`")
    if not path.is_file():
        raise HeadFileError(f"{where} is not a file; give the .npz `edge-ensemble route train` wrote")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # every .npz is a zip file
        raise HeadFileError(f"{where} is not a route head (not an .npz file); give the file `edge-ensemble route"
                            " train` wrote, or train one")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            if not {"W", "b", "meta"} <= names:
                raise HeadFileError(f"{where} is not a route head (it holds {', '.join(sorted(names)) or 'nothing'},"
                                    f" not W, b and meta); {TRAIN_HINT}")
            W, b, meta_text = data["W"], data["b"], data["meta"]
    except HeadFileError:
        raise
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, OSError, ValueError, KeyError) as e:
        raise HeadFileError(f"{where} is corrupt or truncated ({_first_line(e)}); {TRAIN_HINT}") from None
    try:
        meta = json.loads(str(meta_text[()]))
    except (ValueError, TypeError, IndexError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise HeadFileError(f"{where} is not a route head (its metadata is not edge-ensemble's); {TRAIN_HINT}")
    if meta.get("version") != FORMAT_VERSION:
        raise HeadFileError(f"{where} is format version {meta.get('version')}, this edge-ensemble reads version"
                            f" {FORMAT_VERSION}; {TRAIN_HINT}")
    try:
        experts = tuple(str(s) for s in meta["expert_sha256"])
        head = RouterHead(
            W=np.asarray(W, dtype=np.float32), b=np.asarray(b, dtype=np.float32), beta=float(meta["beta"]),
            router_sha256=str(meta["router_sha256"]), expert_sha256=experts,
            expert_names=tuple(str(n) for n in meta.get("expert_names") or [f"expert {i}" for i in range(len(experts))]),
            router_name=str(meta.get("router_name", "")), router_spec=str(meta.get("router_spec", "")),
            hidden_size=int(meta["hidden_size"]), training_data=str(meta.get("training_data", "")),
            date=str(meta.get("date", "")), seed=int(meta.get("seed", 0)),
            heldout_accuracy=meta.get("heldout_accuracy"), extra=dict(meta.get("extra") or {}))
    except (KeyError, TypeError, ValueError, OverflowError) as e:  # (OverflowError: a hidden size of 1e400)
        raise HeadFileError(f"{where} has incomplete metadata ({_first_line(e)}); {TRAIN_HINT}") from None
    k, d = len(experts), head.hidden_size
    if (head.W.shape != (k, d) or head.b.shape != (k,) or k < 1 or len(head.expert_names) != k
            or not np.isfinite(head.W).all() or not np.isfinite(head.b).all()
            or not (np.isfinite(head.beta) and head.beta >= 0)):
        raise HeadFileError(f"{where} is inconsistent (weights {head.W.shape} for {k} experts of hidden size {d}, "
                            f"beta {head.beta}); {TRAIN_HINT}")
    if router_sha is not None or expert_shas is not None:
        shas = list(expert_shas or []) + ([router_sha] if router_sha else [])
        names = [f"expert {i}" for i in range(len(expert_shas or []))] + (["router"] if router_sha else [])
        head.roles(shas, names, where)
    if hidden_size is not None:
        head.check_hidden_size(hidden_size, "given", where)
    return head


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# -- model files ------------------------------------------------------------------------------------------------

_sha_memo: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a model file. Trusted without rehashing a GGUF of hundreds of MB: the verification marker
    the model sources write beside a catalog file (``<file>.sha256``: sha, size, mtime) when size and mtime still
    match, else an earlier answer for the same path, size and mtime (in this process, and in the cache
    directory's ``sha256.json``)."""
    from .paths import cache_dir, write_text_atomic

    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _sha_memo:
        return _sha_memo[key]
    try:
        fields = p.with_name(p.name + ".sha256").read_text("ascii").split()
    except (OSError, UnicodeDecodeError):
        fields = []
    memo_file = cache_dir() / "sha256.json"
    stamp = "|".join(map(str, key))
    if len(fields) >= 3 and fields[1:3] == [str(st.st_size), str(st.st_mtime_ns)] and len(fields[0]) == 64:
        sha = fields[0]
    else:
        try:
            known = json.loads(memo_file.read_text("utf-8"))
        except (OSError, ValueError):
            known = {}
        sha = known.get(stamp) if isinstance(known, dict) else None
        if not (isinstance(sha, str) and len(sha) == 64):
            sha = sha256_file(p)
            known = {**(known if isinstance(known, dict) else {}), stamp: sha}
            try:  # only a memo: a read-only cache just hashes again next time
                memo_file.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(memo_file, json.dumps(known, indent=0))
            except OSError:
                pass
    _sha_memo[key] = sha
    return sha


# -- fitting ----------------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """A fitted head's weights (in the raw hidden-state space) and how the fit went."""

    W: np.ndarray
    b: np.ndarray
    iterations: int
    train_accuracy: float
    heldout_accuracy: float
    heldout_loss: float


def softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_head(X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, n_classes: int, *,
             l2: float = 1e-3, max_iter: int = 2000, patience: int = 20, check_every: int = 10) -> FitResult:
    """Multinomial logistic regression (softmax, L2 on the weights), full-batch Nesterov gradient descent on
    standardised features with the step 1/L of the loss's Lipschitz bound; early stopping keeps the weights with
    the lowest held-out loss (checked every ``check_every`` steps, stopping after ``patience`` checks without a
    gain). No randomness: the same data give the same weights."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    X_val = np.asarray(X_val, dtype=np.float64)
    y_val = np.asarray(y_val, dtype=np.int64)
    n, d = X.shape
    if n == 0:
        raise ValueError("no training positions")
    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    sd[sd < 1e-8] = 1.0
    Z = (X - mu) / sd
    Zv = (X_val - mu) / sd
    Y = np.eye(n_classes)[y]
    # Softmax cross-entropy has a Hessian below 1/2 * (Z'Z / n) per class block: its top eigenvalue bounds L.
    v = np.ones(d) / np.sqrt(d)
    for _ in range(50):  # power iteration from a fixed start (deterministic)
        v = Z.T @ (Z @ v) / n
        v /= np.linalg.norm(v) or 1.0
    lam = float(v @ (Z.T @ (Z @ v)) / n)
    step = 1.0 / (0.5 * (lam + 1.0) + l2)  # +1 for the bias column

    W = np.zeros((d, n_classes))
    b = np.zeros(n_classes)
    W_prev, b_prev = W.copy(), b.copy()
    best = (np.inf, W.copy(), b.copy(), 0)
    since_best = 0
    it = 0
    t = 1  # momentum counter; restarted when the step goes uphill (O'Donoghue & Candes' gradient restart)
    for it in range(1, max_iter + 1):
        mom = (t - 1) / (t + 2)
        Wl, bl = W + mom * (W - W_prev), b + mom * (b - b_prev)
        G = (softmax_rows(Z @ Wl + bl) - Y) / n
        gW, gb = Z.T @ G + l2 * Wl, G.sum(axis=0)
        W_prev, b_prev = W, b
        W, b = Wl - step * gW, bl - step * gb
        t = 1 if float((gW * (W - W_prev)).sum() + (gb * (b - b_prev)).sum()) > 0 else t + 1
        if it % check_every == 0 or it == max_iter:
            loss = _log_loss(Zv, y_val, W, b) if len(y_val) else _log_loss(Z, y, W, b)
            if loss < best[0] - 1e-9:
                best, since_best = (loss, W.copy(), b.copy(), it), 0
            else:
                since_best += 1
                if since_best >= patience:
                    break
    loss, W, b, best_it = best
    W_raw = (W / sd[:, None]).T  # back to raw hidden states: w = W_raw h + b_raw
    b_raw = b - mu @ (W / sd[:, None])
    train_acc = float(np.mean(np.argmax(Z @ W + b, axis=1) == y))
    val_acc = float(np.mean(np.argmax(Zv @ W + b, axis=1) == y_val)) if len(y_val) else float("nan")
    return FitResult(W_raw.astype(np.float32), b_raw.astype(np.float32), best_it, train_acc, val_acc, float(loss))


def _log_loss(Z: np.ndarray, y: np.ndarray, W: np.ndarray, b: np.ndarray) -> float:
    z = Z @ W + b
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def fit_beta(correct: np.ndarray, chosen: np.ndarray, grid: Sequence[float] = BETA_GRID) -> tuple[float, list[float]]:
    """The β of ``grid`` under which the most held-out reference tokens are the argmax of log π_I + β log π_router.

    ``correct[p, k, g]``: at position p, expert k with β = grid[g] puts the reference token first; ``chosen[p]``:
    the expert the head picks there. Returns β (the smallest on a tie, so 0 unless weighting the router helps)
    and the accuracy at every grid point."""
    correct = np.asarray(correct, dtype=bool)
    if correct.shape[0] == 0:
        return 0.0, [float("nan")] * len(grid)
    picked = correct[np.arange(correct.shape[0]), np.asarray(chosen, dtype=np.int64)]  # (positions, grid)
    acc = picked.mean(axis=0)
    g = int(np.argmax(acc))  # the first maximum: the smallest β
    return float(grid[g]), [float(a) for a in acc]
