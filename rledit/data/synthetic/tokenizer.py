"""A word-level tokenizer over exactly the synthetic world's vocabulary.

Word-level means every name and every object word is one token, so " " + target tokenizes to the
target's words whatever precedes it, and prompt and target can be tokenized separately (as the
collator does) with the same ids as the whole sentence. Prompts get a BOS token by default;
`add_special_tokens=False` (used for targets) gives the bare words.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rledit.data.synthetic.world import World

UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK, PAD, BOS, EOS)


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """Specials first, then the world's words in sorted order: the same world gives the same ids."""
    pre_tokenizer = pre_tokenizers.Whitespace()
    words = {word for text in world.texts() for word, _ in pre_tokenizer.pre_tokenize_str(text)}
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *sorted(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, padding_side="right")

