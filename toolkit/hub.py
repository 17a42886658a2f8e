"""Publish a Hugging Face export to the Hub: check it, write its model card, upload it in one commit.

:func:`publish` (what ``megaforge publish`` runs), contacting nothing until every check passed:

1. :func:`select_files` — every file is on the allow-list of Hugging Face model, tokenizer and card
   files (or named with ``include``); anything that looks like training data, a training checkpoint
   or pickled weights is refused, whatever ``include`` says;
2. :func:`check_loads` — the folder loads offline with ``transformers`` (``AutoConfig``,
   ``AutoTokenizer`` and the ``AutoModelFor…`` class of its architecture, with no missing or
   unexpected weights), and ``AutoTokenizer`` gives the ids of the tokenizer files shipped on the
   fidelity probe battery (:func:`check_tokenizer_fidelity`);
3. :func:`~toolkit.model_card.build_card` — ``README.md`` from ``huggingface_hub.ModelCardData`` plus a body written
   from ``megaforge.json`` (the recipe, data, layout and final metrics that
   ``megaforge convert --to hf`` records); an existing ``README.md`` is kept unless
   ``overwrite_card``;
4. ``HfApi.create_repo(exist_ok=True)``, ``create_branch`` for a revision other than ``main``, and
   one ``create_commit`` holding every file; a generated card is written into the folder after it.

The token is never read here: ``huggingface_hub`` finds it (``HF_TOKEN``, or the cache written by
``hf auth login``). The endpoint is ``HF_ENDPOINT`` read at call time (or ``endpoint=``).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.convert.provenance import PROVENANCE_FILE, read_provenance
from toolkit.errors import MegaforgeError, TokenizerError, first_line
from toolkit.model_card import CardOptions, ModelInfo, build_card
from toolkit.tokenization import load_tokenizer
from toolkit.tokenization.fidelity import compare, megaforge_side, transformers_side

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
#: files a Hugging Face model folder holds (weights are matched by WEIGHT_FILE)
ALLOWED_FILES = {
    "config.json", "generation_config.json", "model.safetensors.index.json",  # model
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",  # tokenizer
    "chat_template.jinja", "chat_template.json", CARD_FILE, PROVENANCE_FILE,
}
#: files that hold a tokenizer's vocabulary (one of them must be present)
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                         "sentencepiece.bpe.model")
PROBE_TEXT = "The patient was admitted with chest pain."  # encoded to check the tokenizer works
WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
#: a file other than weights above this size is not a config or tokenizer file
MAX_OTHER_BYTES = 64 * 2**20
#: suffix → why such a file is never uploaded (checked before the allow-list; ``include`` cannot override)
REFUSED_SUFFIXES = {
    **dict.fromkeys([".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".csv", ".csv.gz", ".tsv", ".parquet",
                     ".arrow", ".feather", ".txt", ".txt.gz", ".npy", ".npz", ".db", ".sqlite", ".gz", ".zst",
                     ".xz", ".bz2", ".zip", ".tar", ".tgz"], "looks like training data (text, tables or an archive)"),
    **dict.fromkeys([".bin", ".idx"], "looks like training data (an indexed dataset .bin/.idx) or pickled weights"),
    **dict.fromkeys([".distcp", ".metadata"], "is part of a megaforge training checkpoint (DCP), not of a "
                                              "Hugging Face export"),
    **dict.fromkeys([".pt", ".pth", ".ckpt", ".pkl", ".pickle"], "is a pickle file (only safetensors weights "
                                                                 "are published)"),
}
_AUTO_CLASSES = (  # architecture suffix → (transformers Auto class, Hub pipeline tag)
    ("ForCausalLM", "AutoModelForCausalLM", "text-generation"),
    ("LMHeadModel", "AutoModelForCausalLM", "text-generation"),
    ("ForMaskedLM", "AutoModelForMaskedLM", "fill-mask"),
    ("ForPreTraining", "AutoModelForPreTraining", "fill-mask"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM", "text2text-generation"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "AutoModelForTokenClassification", "token-classification"),
)


class PublishError(MegaforgeError):
    """The folder cannot be published as asked (it does not load, holds refused files, the Hub refused)."""


@dataclass
class PublishPlan:
    """What :func:`publish` sends (or, with ``dry_run``, would send)."""

    folder: Path
    repo_id: str
    revision: str  # branch committed to
    private: bool
    files: list[tuple[str, int]]  # (path in the repo, bytes), README.md included
    card: str  # README.md text
    card_kept: bool  # True: the folder's README.md; False: generated
    skipped: list[str] = field(default_factory=list)  # hidden files not sent
    commit_url: str | None = None  # set after the upload

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


# ---------------------------------------------------------------------------- checks


def check_loads(folder: Path) -> ModelInfo:
    """Load the folder offline with transformers; one-line :class:`PublishError` where it does not."""
    try:
        import transformers
    except ImportError:
        raise PublishError("publishing checks the folder with transformers, which is not installed; "
                           "pip install 'megaforge[hf]'") from None
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a weight-loading bar would only clutter the file list
    try:
        return _check_loads(transformers, folder)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _check_loads(transformers, folder: Path) -> ModelInfo:
    if not (folder / "config.json").is_file():
        raise PublishError(f"{folder} has no config.json: not a Hugging Face model folder (export a run with "
                           "`megaforge convert RUN OUT --to hf` first)")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise PublishError(f"{folder / 'config.json'} does not load with transformers: {first_line(e)}") from None
    architecture = (getattr(config, "architectures", None) or [None])[0]
    match = next(((auto, tag) for suffix, auto, tag in _AUTO_CLASSES if architecture and architecture.endswith(suffix)),
                 None)
    if match is None:
        raise PublishError(f"{folder / 'config.json'} names architecture {architecture!r}, which megaforge does not "
                           "publish (a causal LM, masked LM, seq2seq or classification head is expected)")
    auto_class, pipeline_tag = match
    if not any((folder / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        raise PublishError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_VOCAB_FILES[:3])}, …); export the "
                           "run with its tokenizer/ folder present")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        ids = tokenizer(PROBE_TEXT)["input_ids"]
    except Exception as e:
        raise PublishError(f"the tokenizer in {folder} does not load with transformers ({first_line(e)}); "
                           "export the run with its tokenizer/ folder present") from None
    if not ids:
        raise PublishError(f"the tokenizer in {folder} turns {PROBE_TEXT!r} into no tokens; its files are incomplete")
    check_tokenizer_fidelity(folder, tokenizer)
    dtype_kw = {"dtype": "auto"} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": "auto"}
    try:
        model, report = getattr(transformers, auto_class).from_pretrained(
            folder, local_files_only=True, output_loading_info=True, trust_remote_code=False, use_safetensors=True,
            **dtype_kw)
    except Exception as e:
        raise PublishError(f"the weights in {folder} do not load with transformers.{auto_class}: "
                           f"{first_line(e)}") from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        bad = sorted(str(k) for k in report.get(kind) or [])
        if bad:
            raise PublishError(f"{folder}: transformers reports {kind.replace('_', ' ')} loading {architecture} "
                               f"({', '.join(bad[:3])}{', …' if len(bad) > 3 else ''}); the weights do not match "
                               "config.json")
    if type(model).__name__ != architecture:
        raise PublishError(f"{folder}: {auto_class} built {type(model).__name__}, not {architecture} as config.json "
                           "says")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and (len(tokenizer) > vocab or max(ids) >= vocab):
        raise PublishError(f"{folder}: the tokenizer has {len(tokenizer)} ids but the model's vocabulary is {vocab}; "
                           "they do not belong together")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return ModelInfo(architecture=architecture, auto_class=auto_class, pipeline_tag=pipeline_tag,
                     model_type=config.model_type, parameters=sum(p.numel() for p in model.parameters()), dtype=dtype)


def check_tokenizer_fidelity(folder: Path, hf_tokenizer) -> None:
    """The tokenizer files shipped, as megaforge reads them (``tokenizer.json``, else the SentencePiece
    model or ``vocab.txt``), vs ``hf_tokenizer`` (``AutoTokenizer`` on the folder, which also applies
    ``tokenizer_config.json``) on the fidelity probe battery: a config that contradicts the files
    (say ``do_lower_case: false`` beside a lower-casing ``tokenizer.json``) is refused, exit code 1."""
    try:
        ours = load_tokenizer(str(folder))
    except TokenizerError as e:  # a layout megaforge does not read (vocab.json + merges.txt): nothing to compare
        logger.info(f"note: tokenizer fidelity not checked: {e}")
        return
    compare(megaforge_side(ours, f"the tokenizer files in {folder}"),
            transformers_side(hf_tokenizer, "AutoTokenizer on the folder")).raise_if_failed()


def _refusal(rel: str, size: int) -> str | None:
    """Why ``rel`` must never be uploaded, or None."""
    name = rel.rsplit("/", 1)[-1]
    lower = name.lower()
    if WEIGHT_FILE.fullmatch(name) and "/" not in rel:
        return None
    if lower.endswith(".safetensors"):
        return "is a safetensors file that is not model.safetensors or one of its shards"
    if name in ALLOWED_FILES and "/" not in rel:
        return None if size <= MAX_OTHER_BYTES else (
            f"is {_human(size)}, far larger than a config or tokenizer file; it looks like data, not part of a model")
    if name == "trainer_state.json" or name == "config.yaml":
        return "is part of a megaforge run directory, not of a Hugging Face export"
    for suffix, why in REFUSED_SUFFIXES.items():
        if lower.endswith(suffix):
            return why
    if size > MAX_OTHER_BYTES:
        return f"is {_human(size)} and not a weight file; it looks like data"
    return None


def select_files(folder: Path, include: tuple[str, ...] = ()) -> tuple[list[tuple[str, int]], list[str]]:
    """(files to upload as (path in repo, bytes), hidden paths skipped). Refused or unlisted files raise."""
    if (folder / "checkpoints").is_dir() or (folder / "config.yaml").is_file():
        raise PublishError(f"{folder} is a megaforge run directory; export it first with "
                           f"`megaforge convert {folder} OUT --to hf --verify` and publish OUT")
    files, skipped = [], []
    root = folder.resolve()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            if path.is_file():
                skipped.append(rel)  # .cache/, .gitattributes, editor files: never sent
            continue
        if path.is_symlink():
            if not path.exists():
                raise PublishError(f"{path} is a broken link; remove it before publishing")
            target = path.resolve()
            if not target.is_relative_to(root):  # its target would be uploaded under the link's name
                raise PublishError(f"{path} is a symbolic link to {target}, outside {folder}; copy that file into "
                                   "the folder instead, or remove the link")
        if not path.is_file():
            continue
        size = path.stat().st_size
        why = _refusal(rel, size)
        if why is not None:
            raise PublishError(f"refusing to publish {path}: it {why}; move it out of {folder}")
        listed = (rel in ALLOWED_FILES or WEIGHT_FILE.fullmatch(rel)) and "/" not in rel
        if not listed and not any(fnmatch.fnmatch(rel, pattern) for pattern in include):
            raise PublishError(f"{path} is not a Hugging Face model, tokenizer or card file, so it is not uploaded "
                               f"silently; move it out of {folder}, or name it with --include '{rel}'")
        files.append((rel, size))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as e:
            raise PublishError(f"{index} is not a valid safetensors index ({e})") from None
        stale = [rel for rel, _ in files if rel.endswith(".safetensors") and rel not in shards]
        if stale:
            raise PublishError(f"{folder / stale[0]} is not listed in {index.name}: a shard left from another export; "
                               "delete it")
    if not any(WEIGHT_FILE.fullmatch(rel) for rel, _ in files):
        raise PublishError(f"{folder} has no model.safetensors (or shards); only safetensors weights are published")
    return files, skipped


# ---------------------------------------------------------------------------- publishing


def check_repo_id(repo_id: str) -> None:
    """A one-line :class:`PublishError` unless ``repo_id`` is NAMESPACE/NAME as the Hub accepts it
    (``huggingface_hub.utils.validate_repo_id``: no ``..`` or ``--``, no leading or trailing ``.``/``-``,
    at most 96 characters)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    hint = "write it as NAMESPACE/NAME, e.g. alice/gpt-tiny"
    if not isinstance(repo_id, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise PublishError(f"{repo_id!r} is not a Hub repository id; {hint}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        reason = first_line(e).split(f": '{repo_id}'")[0].rstrip(".")
        raise PublishError(f"{repo_id!r} is not a Hub repository id ({reason}); {hint}") from None


def publish(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
            dry_run: bool = False, overwrite_card: bool = False, card_options: CardOptions = CardOptions(),
            include: tuple[str, ...] = (), commit_message: str | None = None,
            endpoint: str | None = None) -> PublishPlan:
    """Check ``folder``, write its model card and upload it to ``repo_id`` in one commit (see the module
    docstring). ``dry_run``: print what would be sent and the card; nothing is written or contacted."""
    check_repo_id(repo_id)  # first: a dry run must fail on an id the Hub would refuse
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder; pass the output folder of `megaforge convert ... --to hf`")
    revision = revision or "main"
    files, skipped = select_files(folder, tuple(include))
    info = check_loads(folder)
    card_path = folder / CARD_FILE
    card_kept = card_path.is_file() and not overwrite_card
    if card_kept:
        card = card_path.read_text()
    else:
        card = str(build_card(repo_id, info, read_provenance(folder), card_options))
        files = [(rel, size) for rel, size in files if rel != CARD_FILE] + [(CARD_FILE, len(card.encode()))]
    plan = PublishPlan(folder=folder, repo_id=repo_id, revision=revision, private=private, files=files, card=card,
                       card_kept=card_kept, skipped=skipped)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    if not card_kept and not card_options.license:
        logger.info("note: the generated card names no license; pass --license (e.g. apache-2.0, mit, cc-by-4.0)")
    if dry_run:
        logger.info(describe(plan, endpoint, dry_run=True))
        return plan
    logger.info(describe(plan, endpoint, dry_run=False))
    plan.commit_url = _upload(plan, info, endpoint, commit_message)
    if not card_kept:  # written once published, so a failed upload leaves the folder as it was
        card_path.write_text(card)
    logger.info(f"published: {plan.commit_url}")
    return plan


def _upload(plan: PublishPlan, info: ModelInfo, endpoint: str, commit_message: str | None) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint)
    where = f"{endpoint}/{plan.repo_id}"
    try:
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")
        if plan.private and not api.repo_info(plan.repo_id, repo_type="model").private:
            raise PublishError(f"{where} already exists and is public; --private would publish into it — make it "
                               "private in its settings first, or choose another repository id")
        if plan.revision != "main":
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True, repo_type="model")
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=plan.card.encode() if rel == CARD_FILE and
                                  not plan.card_kept else str(plan.folder / rel)) for rel, _ in plan.files]
        commit = api.create_commit(plan.repo_id, ops, repo_type="model", revision=plan.revision,
                                   commit_message=commit_message or f"Upload {info.architecture} exported by megaforge")
    except PublishError:
        raise
    except Exception as e:
        if not _is_transfer_error(e):
            raise
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = {401: "; log in with `hf auth login` or set HF_TOKEN to a token with write access",
                403: "; the token has no write access to this namespace"}.get(status, "")
        raise PublishError(f"publishing to {where} failed: {first_line(e)}{hint}") from None
    return commit.commit_url


def _is_transfer_error(e: Exception) -> bool:
    """An error from the network or the Hub (shown as one line), as opposed to a bug (left as is)."""
    return isinstance(e, (OSError, ValueError)) or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "requests",
                                                                                        "huggingface_hub")


def describe(plan: PublishPlan, endpoint: str, *, dry_run: bool) -> str:
    width = max(len(rel) for rel, _ in plan.files)
    visibility = "private" if plan.private else "public"
    head = (f"dry run: nothing is written or sent. Would create (if missing) the {visibility} model repository "
            f"{endpoint}/{plan.repo_id} and commit to branch {plan.revision}:" if dry_run else
            f"uploading to {endpoint}/{plan.repo_id} ({visibility}, branch {plan.revision}) in one commit:")
    lines = [head]
    for rel, size in plan.files:
        note = f"  (model card, {'kept' if plan.card_kept else 'generated'})" if rel == CARD_FILE else ""
        lines.append(f"  {rel:<{width}}  {_human(size):>10}{note}")
    lines.append(f"  total: {len(plan.files)} files, {_human(plan.total_bytes)}")
    if plan.skipped:
        lines.append(f"  not sent (hidden): {', '.join(plan.skipped)}")
    if dry_run:
        lines += ["", f"--- {CARD_FILE} ---", plan.card.rstrip(), f"--- end of {CARD_FILE} ---"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- small helpers


def _human(n: int) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"

