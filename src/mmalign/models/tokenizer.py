"""Word-level tokenizers built offline from a data set's own text.

The tiny models of the embedded world need a tokenizer that no hub has to provide: the vocabulary is the set of
words (and punctuation marks) found in the data, plus the special tokens of the architecture being imitated.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Metaspace marks word starts with "▁" so that decoding restores spaces; punctuation is split off so that
# "star." and "star" share a token.
_META = "▁"
_PIECES_PER_CALL = 4096


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Split on every kind of whitespace first: a word glued to a newline ("assistant\nThere") would otherwise be
    # one unknown token, and a prompt tokenized alone would not be a prefix of the full conversation's tokens.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="always"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )


def words_of(texts: Iterable[str]) -> set[str]:
    """The word-level tokens a corpus needs (as the tokenizer will see them)."""
    pre = _pre_tokenizer()
    # The pre-tokenizer splits on whitespace first and treats every piece alone, so the corpus's tokens are those of
    # its distinct space-separated pieces (a piece may still hold a newline; the pre-tokenizer splits it), and many
    # pieces joined by spaces split in one call as they would one by one, much faster than a call per caption.
    pieces: set[str] = set()
    for text in set(texts):
        pieces.update(text.split(" "))
    ordered = sorted(pieces)
    found: set[str] = set()
    for start in range(0, len(ordered), _PIECES_PER_CALL):
        found.update(tok for tok, _ in pre.pre_tokenize_str(" ".join(ordered[start : start + _PIECES_PER_CALL])))
    return found


def build_word_tokenizer(
    texts: Iterable[str],
    *,
    special_tokens: Sequence[str],
    pad_token: str,
    unk_token: str,
    eos_token: str,
    bos_token: str | None = None,
    chat_template: str | None = None,
    extra_words: Iterable[str] = (),
) -> PreTrainedTokenizerFast:
    """Build a word-level ``PreTrainedTokenizerFast`` whose vocabulary covers ``texts``.

    Args:
        texts: corpus whose words make the vocabulary (sorted, so the ids are deterministic).
        special_tokens: tokens never split (chat markers, image tokens...); they take the first ids.
        pad_token / unk_token / eos_token / bos_token: must be among ``special_tokens``.
        chat_template: Jinja chat template stored on the tokenizer.
        extra_words: plain words added to the vocabulary even if absent from ``texts``.
    """
    specials = list(dict.fromkeys(special_tokens))
    for tok in (pad_token, unk_token, eos_token, bos_token):
        if tok is not None and tok not in specials:
            raise ValueError(f"special token {tok!r} missing from special_tokens")
    words = sorted((words_of(texts) | words_of(extra_words)) - set(specials))
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=unk_token))
    core.pre_tokenizer = _pre_tokenizer()
    core.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="always")
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=pad_token,
        unk_token=unk_token,
        eos_token=eos_token,
        bos_token=bos_token,
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
