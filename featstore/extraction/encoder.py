"""A frozen Hugging Face encoder: loading, tokenization into windows, and the forward pass.

The same `FrozenEncoder` produces the features written by extraction and the live
features used at prediction time, so store and live encoder agree by construction;
the parity tests check that against plain `transformers` calls.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, CorpusError, ModelError
from ..store.encoding import decode_hidden, split_wire
from ..store.format import COMPUTE_DTYPES, ENCODINGS, STORAGE_DTYPES, sha256_json
from ..store.manifest import EncoderInfo
from .corpus import Example
from .models import resolve_model
from .windows import plan_windows

logger = logging.getLogger(__name__)

# Config entries that name or describe a checkpoint but do not change what it computes.
VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "architectures",
                        "torch_dtype", "dtype", "_attn_implementation_autoset", "use_cache", "output_attentions",
                        "output_hidden_states", "return_dict"}
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class TokenizedSequence:
    """One corpus example as stored: its tokens, and the windows that compute them.

    ``gather`` holds, for every stored token, ``(window index, position in window)``.
    """

    input_ids: np.ndarray  # (T,) int32
    word_ids: np.ndarray  # (T,) int32, -1 for special tokens
    token_window: np.ndarray  # (T,) int16
    windows: list[list[int]]  # input ids of each window, special tokens included
    gather: np.ndarray  # (T, 2) int64
    num_words: int
    truncated: bool

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def cost(self) -> int:
        """Tokens of encoder work, padded to the longest window."""
        return len(self.windows) * max(len(window) for window in self.windows)


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    compute_dtype: str
    storage_dtype: str


def choose_dtypes(device: str | None, dtype: str | None, compute_dtype: str | None) -> DeviceChoice:
    """Defaults: CUDA computes and stores float16; CPU computes float32 and stores float16."""
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    storage = dtype or "float16"
    if storage not in STORAGE_DTYPES:
        raise ConfigError(f"unknown dtype {storage!r}; choose one of {', '.join(STORAGE_DTYPES)}")
    on_cuda = storage if storage in COMPUTE_DTYPES else "float16"
    compute = compute_dtype or (on_cuda if resolved.type == "cuda" else "float32")
    if compute not in COMPUTE_DTYPES:
        raise ConfigError(f"unknown compute dtype {compute!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
    return DeviceChoice(resolved, compute, storage)


class FrozenEncoder:
    """A Hugging Face `AutoModel` in eval mode under `inference_mode`, plus its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, name_or_path: str, choice: DeviceChoice,
                 weights_sha256: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path
        self.device = choice.device
        self.compute_dtype = choice.compute_dtype
        self.storage_dtype = choice.storage_dtype
        self.weights_sha256 = weights_sha256
        self.prefix_ids, self.suffix_ids = _special_template(tokenizer)
        self.pad_id = _pad_id(model.config, tokenizer)

    @classmethod
    def load(cls, model: str | None = None, device: str | None = None, dtype: str | None = None,
             compute_dtype: str | None = None, progress: bool = True) -> FrozenEncoder:
        """Load from a local path or the local Hugging Face cache; never downloads. `progress=False` hides
        the library's loading bar."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        name_or_path = resolve_model(model)
        choice = choose_dtypes(device, dtype, compute_dtype)
        local = Path(name_or_path).exists()
        if not local and (name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1):
            raise ModelError(f"model path {name_or_path!r} does not exist; pass a directory holding the "
                                 "encoder's config, weights and tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
            if getattr(tokenizer, "add_prefix_space", None) is False:
                # Byte-level BPE (GPT-2, RoBERTa) needs it to tokenize pre-split words.
                tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True,
                                                          add_prefix_space=True)
            bars_were_on = hf_logging.is_progress_bar_enabled()
            if not progress:
                hf_logging.disable_progress_bar()
            try:
                encoder = AutoModel.from_pretrained(name_or_path, local_files_only=True, dtype=torch.float32)
            finally:
                if bars_were_on:
                    hf_logging.enable_progress_bar()
        except OSError as error:
            where = "local path" if local else "model id (looked up in the local Hugging Face cache only)"
            raise ModelError(f"cannot load encoder {name_or_path!r} as a {where}: {error}. featstore "
                                 "never downloads: pass a local directory with config, weights and tokenizer, "
                                 "or a hub id already in the cache") from None
        if not tokenizer.is_fast:
            raise ModelError(f"encoder {name_or_path!r} has no fast (Rust) tokenizer; featstore needs one "
                                 "for word alignment")
        weights = _weights_sha256(encoder)
        encoder.requires_grad_(False)
        encoder.eval()
        encoder.to(device=choice.device, dtype=TORCH_DTYPES[choice.compute_dtype])
        logger.info("loaded %s (%s) on %s, compute %s, storage %s", name_or_path, type(encoder).__name__,
                    choice.device, choice.compute_dtype, choice.storage_dtype)
        return cls(encoder, tokenizer, name_or_path, choice, weights)

    # --- description -------------------------------------------------------------------------------
    @property
    def num_hidden_states(self) -> int:
        """Embeddings plus one per transformer layer."""
        return self.model.config.num_hidden_layers + 1

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def max_length(self) -> int:
        """Longest input the model accepts: the tokenizer's limit capped by the position table."""
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if config.model_type in ("roberta", "xlm-roberta", "camembert") and positions:
            positions -= 2  # position ids start after the padding index
        limits = [limit for limit in (positions, self.tokenizer.model_max_length) if limit and limit < 10**6]
        return min(limits) if limits else 512

    def resolve_layers(self, layers: Sequence[int] | None) -> list[int]:
        """Hidden-state indices (0 = embeddings); negative indices count from the last layer."""
        count = self.num_hidden_states
        if layers is None:
            return list(range(count))
        resolved = []
        for layer in layers:
            if not -count <= layer < count:
                raise ConfigError(f"layer {layer} does not exist: {self.name_or_path} has {count} hidden "
                                     f"states (0 = embeddings .. {count - 1}; negative indices count back)")
            resolved.append(layer % count)
        if len(set(resolved)) != len(resolved):
            raise ConfigError(f"layers {list(layers)} name the same hidden state twice")
        return sorted(resolved)

    def describe(self) -> EncoderInfo:
        config = {key: value for key, value in self.model.config.to_dict().items()
                  if key not in VOLATILE_CONFIG_KEYS}
        return EncoderInfo(
            name_or_path=self.name_or_path,
            model_class=type(self.model).__name__,
            model_type=self.model.config.model_type,
            revision=getattr(self.model.config, "_commit_hash", None),
            weights_sha256=self.weights_sha256,
            config=config,
            config_sha256=sha256_json(config),
            tokenizer_class=type(self.tokenizer).__name__,
            tokenizer_sha256=_tokenizer_sha256(self.tokenizer),
            num_hidden_states=self.num_hidden_states,
            hidden_size=self.hidden_size,
            special_prefix_ids=self.prefix_ids,
            special_suffix_ids=self.suffix_ids,
        )

    # --- tokenization --------------------------------------------------------------------------------
    def split_words(self, text: str) -> list[tuple[str, tuple[int, int]]]:
        """Raw text as words with their character offsets, split the way this tokenizer pre-tokenizes
        (whitespace and punctuation for BERT-style tokenizers: "Apple," is two words), so that words match
        what word-level corpora such as CoNLL hold. Falls back to words and punctuation runs."""
        pre_tokenizer = getattr(self.tokenizer.backend_tokenizer, "pre_tokenizer", None)
        pieces = pre_tokenizer.pre_tokenize_str(text) if pre_tokenizer is not None else [
            (match.group(), match.span()) for match in re.finditer(r"\w+|[^\w\s]+", text)]
        words = []
        for _, (start, end) in pieces:  # byte-level pre-tokenizers mark spaces in the piece: use the offsets
            piece = text[start:end]
            stripped = piece.strip()
            if stripped:
                start += len(piece) - len(piece.lstrip())
                words.append((stripped, (start, start + len(stripped))))
        return words

    def tokenize(self, examples: Sequence[Example], max_length: int | None = None, stride: int | None = None,
                 truncate: bool = False) -> list[TokenizedSequence]:
        """Token ids, word alignment and windows for each example (words or text)."""
        budget = (max_length or self.max_length) - len(self.prefix_ids) - len(self.suffix_ids)
        stride = default_stride(budget) if stride is None else stride
        content = self._content_tokens(examples)
        return [self._build(ids, words, budget, stride, truncate) for ids, words in content]

    def _content_tokens(self, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
        words_mode = examples[0].words is not None
        inputs = [list(example.words) if words_mode else example.text for example in examples]
        # verbose=False: inputs longer than the model maximum are expected here; windows handle them.
        encoded = self.tokenizer(inputs, is_split_into_words=words_mode, add_special_tokens=False, verbose=False)
        result = []
        for row, example in enumerate(examples):
            ids, word_ids = encoded["input_ids"][row], encoded.word_ids(row)
            if words_mode and len(set(word_ids) - {None}) < len(example.words):
                ids, word_ids = self._tokenize_with_unknowns(example.words)
            result.append((ids, _dense_word_ids(word_ids)))
        return result

    def _tokenize_with_unknowns(self, words: Sequence[str]) -> tuple[list[int], list[int | None]]:
        """Words that tokenize to nothing (stray control characters) become the unknown token."""
        unk = self.tokenizer.unk_token
        pieces = [self.tokenizer([word], is_split_into_words=True, add_special_tokens=False)["input_ids"]
                  for word in words]
        if unk is None and any(not piece for piece in pieces):
            raise CorpusError(f"a word in {list(words)[:8]}... has no tokens and the tokenizer has no "
                                 "unknown token; remove such words from the corpus")
        fixed = [word if piece else unk for word, piece in zip(words, pieces)]
        logger.warning("%d words produced no tokens and were replaced by %r", pieces.count([]), unk)
        encoded = self.tokenizer(fixed, is_split_into_words=True, add_special_tokens=False, verbose=False)
        return encoded["input_ids"], encoded.word_ids()

    def _build(self, content_ids: list[int], word_ids: list[int], budget: int, stride: int,
               truncate: bool) -> TokenizedSequence:
        if not content_ids:
            raise CorpusError("an example produced no tokens at all; remove empty rows from the corpus")
        windows, content_window = plan_windows(word_ids, budget, stride, truncate)
        prefix, suffix = self.prefix_ids, self.suffix_ids
        kept = len(content_window)
        window_ids = [prefix + content_ids[start:end] + suffix for start, end in windows]
        starts = np.array([start for start, _ in windows], dtype=np.int64)
        content_positions = np.arange(kept) - starts[content_window] + len(prefix)
        last = len(windows) - 1
        last_content = windows[last][1] - windows[last][0]
        token_window = np.concatenate([np.zeros(len(prefix), np.int16), content_window,
                                       np.full(len(suffix), last, np.int16)])
        positions = np.concatenate([np.arange(len(prefix)), content_positions,
                                    len(prefix) + last_content + np.arange(len(suffix))])
        content_words = np.asarray(word_ids[:kept], dtype=np.int32)
        return TokenizedSequence(
            input_ids=np.asarray(prefix + content_ids[:kept] + suffix, dtype=np.int32),
            word_ids=np.concatenate([np.full(len(prefix), -1, np.int32), content_words,
                                     np.full(len(suffix), -1, np.int32)]),
            token_window=token_window,
            windows=window_ids,
            gather=np.stack([token_window.astype(np.int64), positions.astype(np.int64)], axis=1),
            num_words=int(content_words.max()) + 1,
            truncated=kept < len(content_ids),
        )

    # --- forward ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, sequences: Sequence[TokenizedSequence], layers: Sequence[int],
                max_batch_tokens: int | None = None) -> torch.Tensor:
        """Hidden states of every stored token of `sequences`, concatenated: (sum T, len(layers), H).

        Returned as `to_storage` encodes it, on the encoder's device (so a GPU does the quantising).
        Windows are run in groups of at most `max_batch_tokens` padded tokens.
        """
        windows = [window for sequence in sequences for window in sequence.windows]
        window_base = np.cumsum([0] + [len(sequence.windows) for sequence in sequences])[:-1]
        gather = np.concatenate([sequence.gather + np.array([base, 0])
                                 for sequence, base in zip(sequences, window_base)])
        encoding = ENCODINGS[self.storage_dtype]
        out = torch.empty((len(gather), len(layers), self.hidden_size), device=self.device,
                          dtype=TORCH_DTYPES[self.compute_dtype if encoding.scaled else self.storage_dtype])
        for group in _window_groups(windows, max_batch_tokens):
            rows = np.nonzero((gather[:, 0] >= group.start) & (gather[:, 0] < group.stop))[0]
            hidden_states = self.hidden_states(windows[group.start:group.stop])
            width = hidden_states[0].shape[1]
            flat_index = torch.as_tensor((gather[rows, 0] - group.start) * width + gather[rows, 1],
                                         device=self.device)
            row_index = torch.as_tensor(rows, device=self.device)
            for slot, layer in enumerate(layers):
                layer_states = hidden_states[layer].reshape(-1, self.hidden_size)
                out[row_index, slot] = layer_states[flat_index].to(out.dtype)
        return to_storage(out, self.storage_dtype)

    def features(self, sequences: Sequence[TokenizedSequence], layers: Sequence[int],
                 max_batch_tokens: int | None = None) -> np.ndarray:
        """What a store of this encoder's storage dtype reads back for `sequences` (`decode_hidden` of the stored
        form, on the host): the live side of every store-versus-encoder comparison and of prediction."""
        stored = self.forward(sequences, layers, max_batch_tokens).cpu().numpy()
        encoding = ENCODINGS[self.storage_dtype]
        codes, scales = split_wire(stored, np.dtype(encoding.array_dtype), encoding.scaled)
        return decode_hidden(codes, self.storage_dtype, scales)

    def hidden_states(self, windows: Sequence[list[int]]) -> tuple[torch.Tensor, ...]:
        """The bare forward pass: all hidden states of right-padded windows, (B, T, H) each."""
        width = max(len(window) for window in windows)
        input_ids = torch.full((len(windows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(windows), width), dtype=torch.long)
        for row, window in enumerate(windows):
            input_ids[row, : len(window)] = torch.as_tensor(window)
            attention_mask[row, : len(window)] = 1
        outputs = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                             output_hidden_states=True, return_dict=True)
        return outputs.hidden_states


def to_storage(hidden: torch.Tensor, storage_dtype: str) -> torch.Tensor:
    """Hidden states (T, L, H) in a storage encoding, as one tensor for the trip to the writer: float16 or float32
    as they are; bfloat16 as its int16 bits; a scaled encoding as bytes (T, L, H * itemsize + 4), each row its
    codes followed by its float32 scale (`featstore.store.encoding.split_wire` takes them apart)."""
    encoding = ENCODINGS[storage_dtype]
    if not encoding.scaled:
        stored = hidden.to(TORCH_DTYPES[storage_dtype])
        return stored.view(torch.int16) if storage_dtype == "bfloat16" else stored
    values = hidden.float()
    scales = values.abs().amax(dim=-1, keepdim=True) / encoding.code_max
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row: any scale decodes it
    codes = values / scales
    if storage_dtype == "int8":
        codes = codes.round_().clamp_(-encoding.code_max, encoding.code_max).to(torch.int8)
    else:
        codes = codes.to(torch.float8_e4m3fn)
    return torch.cat([codes.view(torch.uint8), scales.view(torch.uint8)], dim=-1)


def default_stride(budget: int) -> int:
    """Default overlap between windows: a quarter of the window, at most 128 tokens."""
    return min(128, budget // 4)


def _window_groups(windows: Sequence[list[int]], max_batch_tokens: int | None) -> list[range]:
    """Consecutive runs of windows whose padded size stays within the budget (at least one each)."""
    groups, start, width = [], 0, 0
    for index, window in enumerate(windows):
        new_width = max(width, len(window))
        if max_batch_tokens and index > start and new_width * (index - start + 1) > max_batch_tokens:
            groups.append(range(start, index))
            start, new_width = index, len(window)
        width = new_width
    groups.append(range(start, len(windows)))
    return groups


def _dense_word_ids(word_ids: Sequence[int | None]) -> list[int]:
    """Renumber word ids 0..n-1 in order of appearance; tokens without a word join the previous one."""
    dense, mapping, previous = [], {}, 0
    for word in word_ids:
        if word is not None and word not in mapping:
            mapping[word] = len(mapping)
        previous = mapping[word] if word is not None else previous
        dense.append(previous)
    return dense


def _special_template(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single sequence."""
    content = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(content) + 1):
        if full[start: start + len(content)] == content:
            return full[:start], full[start + len(content):]
    raise ModelError(f"cannot locate content tokens inside {type(tokenizer).__name__}'s special-token "
                         "template")


def _pad_id(config: Any, tokenizer: Any) -> int:
    # RoBERTa derives position ids from the padding index, so pad with the model's own id.
    for candidate in (getattr(config, "pad_token_id", None), tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


def _weights_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tokenizer_sha256(tokenizer: Any) -> str:
    backend = tokenizer.backend_tokenizer.to_str()
    return sha256_json({"backend": backend, "special": tokenizer.special_tokens_map,
                        "add_prefix_space": getattr(tokenizer, "add_prefix_space", None)})
