"""Tokenising for encoder-decoder (seq2seq) models such as T5, and the choice of encoder by model kind.

A seq2seq training row is the prompt as the encoder input and ``[decoder start] + answer + EOS`` as the decoder
input. Its ``labels`` are written in the *decoder sequence* layout, ``[-100] + answer + EOS`` (the same length as
``decoder_input_ids``): decoder position i predicts label i + 1, exactly the next-token shift of a decoder-only
row. So ``model.losses.answer_logits`` / ``token_cross_entropy_sum`` and the loop's token count (``labels[:, 1:]``) are
the same for both kinds; only the forward pass (``model.losses.answer_forward``) and the collation (``batching``) differ. The decoder's
last input (EOS) yields one logit no label uses, as a decoder-only row's last position does.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset

from .batching import IGNORE_INDEX
from .dataset import Encoder
from .tasks import Task


@dataclass
class Seq2SeqEncoder(Encoder):
    """Turns (task, row) into token ids for an encoder-decoder model; never uses a chat template.

    Attributes:
        decoder_start_token_id: the model's ``config.decoder_start_token_id`` (T5: the pad token; BART: EOS).
    """

    decoder_start_token_id: int = 0

    def encode_answer(self, label: str) -> list[int]:
        """Answer token ids: the label (no leading space: the decoder starts fresh) followed by EOS, at most
        ``max_target_length`` tokens."""
        ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
        return ids[: self.max_target_length - 1] + [self.tokenizer.eos_token_id]

    def train_features(self, task: Task, rows: list[dict]) -> tuple[Dataset, int]:
        """Tokenised training rows: ``input_ids`` (prompt), ``decoder_input_ids`` (start + answer) and ``labels``
        (-100 + answer, the decoder sequence layout), and the count of truncated prompts."""
        feats, truncated = [], 0
        for row in rows:
            prompt, cut = self.encode_prompt(task, row["sentence"])
            truncated += cut
            answer = self.encode_answer(row["label"])
            feats.append({"input_ids": prompt, "decoder_input_ids": [self.decoder_start_token_id] + answer,
                          "labels": [IGNORE_INDEX] + answer})
        return Dataset.from_list(feats), truncated


def encoder_for(config, tokenizer, max_source_length: int, max_target_length: int, chat_template: bool) -> Encoder:
    """The encoder for a model kind: ``Seq2SeqEncoder`` for an encoder-decoder ``config`` (no chat template: T5
    and BART were not trained with one), else the decoder-only ``Encoder``, wrapping prompts in the tokenizer's
    chat template when ``chat_template`` is on and the tokenizer has one."""
    if getattr(config, "is_encoder_decoder", False):
        start = config.decoder_start_token_id
        if start is None:
            start = tokenizer.pad_token_id
        return Seq2SeqEncoder(tokenizer, max_source_length, max_target_length, False, decoder_start_token_id=start)
    chat = chat_template and getattr(tokenizer, "chat_template", None) is not None
    return Encoder(tokenizer, max_source_length, max_target_length, chat)
