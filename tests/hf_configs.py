"""Tiny, randomly initialised Hugging Face models for capture tests (no hub access, no downloads).

``build(arch)`` returns the transformers model class a user would load for ARCH (ForCausalLM for
decoders, ForMaskedLM for BERT-style encoders, ForConditionalGeneration for T5/BART, ViTModel for ViT)
built from a small config (2 layers, hidden 32, 4 heads of 8, vocab 128) with eager attention, fixed
seed, in eval mode. ``EXPECTED_ATTENTION_SITES[arch]`` is how many attention (softmax) sites the
captured graph holds: layers x attention blocks per layer (encoder-decoders: encoder self-attention +
decoder self-attention + decoder cross-attention).

This module holds no tests; tests/test_hf_capture.py and examples/hf_capture_survey.py import it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

__all__ = ["ARCHITECTURES", "EXPECTED_ATTENTION_SITES", "LAYERS", "build", "main_output"]

VOCAB = 128
HIDDEN = 32
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
FFN = 64
LAYERS = 2
MAX_POS = 64
SEED = 0

# fields shared by the Llama-style configs (hidden_size / num_attention_heads / intermediate_size naming)
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, max_position_embeddings=MAX_POS, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2)
_BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=FFN, max_position_embeddings=MAX_POS, type_vocab_size=2, pad_token_id=0,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _config(arch: str):
    import transformers as T

    if arch == "gpt2":
        return T.GPT2LMHeadModel, T.GPT2Config(
            vocab_size=VOCAB, n_positions=MAX_POS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "bert":
        return T.BertForMaskedLM, T.BertConfig(**_BERT_LIKE)
    if arch == "roberta":
        # RoBERTa offsets positions by padding_idx + 1, so it needs max_position_embeddings > seq + 2
        return T.RobertaForMaskedLM, T.RobertaConfig(**{**_BERT_LIKE, "pad_token_id": 1, "bos_token_id": 0,
                                                         "eos_token_id": 2})
    if arch == "distilbert":
        return T.DistilBertForMaskedLM, T.DistilBertConfig(
            vocab_size=VOCAB, max_position_embeddings=MAX_POS, n_layers=LAYERS, n_heads=HEADS, dim=HIDDEN,
            hidden_dim=FFN, dropout=0.0, attention_dropout=0.0, pad_token_id=0)
    if arch == "albert":
        return T.AlbertForMaskedLM, T.AlbertConfig(**{**_BERT_LIKE, "embedding_size": 16, "num_hidden_groups": 1,
                                                       "inner_group_num": 1})
    if arch == "electra":
        return T.ElectraForMaskedLM, T.ElectraConfig(**{**_BERT_LIKE, "embedding_size": 16})
    if arch == "deberta-v2":
        # DeBERTa-v3 layout: disentangled relative attention (c2p + p2c), log buckets, shared keys
        return T.DebertaV2ForMaskedLM, T.DebertaV2Config(
            **{**_BERT_LIKE, "type_vocab_size": 0}, relative_attention=True, max_relative_positions=-1,
            position_buckets=16, pos_att_type=["p2c", "c2p"], position_biased_input=False,
            norm_rel_ebd="layer_norm", share_att_key=True)
    if arch == "llama":
        return T.LlamaForCausalLM, T.LlamaConfig(**_LLAMA_LIKE, num_key_value_heads=2,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "mistral":
        return T.MistralForCausalLM, T.MistralConfig(**_LLAMA_LIKE, num_key_value_heads=1, head_dim=HEAD_DIM,
                                                     sliding_window=MAX_POS)
    if arch == "qwen2":
        return T.Qwen2ForCausalLM, T.Qwen2Config(**_LLAMA_LIKE, num_key_value_heads=2)
    if arch == "qwen3":
        return T.Qwen3ForCausalLM, T.Qwen3Config(**_LLAMA_LIKE, num_key_value_heads=2, head_dim=HEAD_DIM)
    if arch == "gemma":
        return T.GemmaForCausalLM, T.GemmaConfig(**_LLAMA_LIKE, num_key_value_heads=1, head_dim=HEAD_DIM)
    if arch == "gemma2":
        # logit soft-capping (tanh) on the scores, alternating sliding-window / global layers
        return T.Gemma2ForCausalLM, T.Gemma2Config(**_LLAMA_LIKE, num_key_value_heads=2, head_dim=HEAD_DIM,
                                                   query_pre_attn_scalar=HEAD_DIM, sliding_window=8,
                                                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if arch == "phi3":
        return T.Phi3ForCausalLM, T.Phi3Config(**_LLAMA_LIKE, num_key_value_heads=HEADS,
                                               original_max_position_embeddings=MAX_POS, resid_pdrop=0.0,
                                               embd_pdrop=0.0)
    if arch == "opt":
        return T.OPTForCausalLM, T.OPTConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=FFN, num_attention_heads=HEADS,
            max_position_embeddings=MAX_POS, word_embed_proj_dim=HIDDEN, dropout=0.0, attention_dropout=0.0,
            pad_token_id=1, bos_token_id=2, eos_token_id=2)
    if arch == "gpt-neox":
        return T.GPTNeoXForCausalLM, T.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FFN, max_position_embeddings=MAX_POS, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    if arch == "falcon":
        # Falcon-7B layout: one shared K/V head (multi-query), parallel attention + MLP, rotary
        return T.FalconForCausalLM, T.FalconConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            new_decoder_architecture=False, multi_query=True, parallel_attn=True, alibi=False, bias=False,
            max_position_embeddings=MAX_POS, hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
    if arch == "gptj":
        return T.GPTJForCausalLM, T.GPTJConfig(
            vocab_size=VOCAB, n_positions=MAX_POS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, rotary_dim=4,
            n_inner=FFN, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
    if arch == "bloom":
        return T.BloomForCausalLM, T.BloomConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, hidden_dropout=0.0,
            attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "stablelm":
        return T.StableLmForCausalLM, T.StableLmConfig(
            **_LLAMA_LIKE, num_key_value_heads=HEADS,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    if arch == "olmo":
        return T.OlmoForCausalLM, T.OlmoConfig(**_LLAMA_LIKE, num_key_value_heads=HEADS)
    if arch == "starcoder2":
        return T.Starcoder2ForCausalLM, T.Starcoder2Config(**_LLAMA_LIKE, num_key_value_heads=2,
                                                           sliding_window=MAX_POS, residual_dropout=0.0,
                                                           embedding_dropout=0.0)
    if arch == "t5":
        return T.T5ForConditionalGeneration, T.T5Config(
            vocab_size=VOCAB, d_model=HIDDEN, d_kv=HEAD_DIM, d_ff=FFN, num_layers=LAYERS, num_decoder_layers=LAYERS,
            num_heads=HEADS, relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    if arch == "bart":
        return T.BartForConditionalGeneration, T.BartConfig(
            vocab_size=VOCAB, max_position_embeddings=MAX_POS, d_model=HIDDEN, encoder_layers=LAYERS,
            decoder_layers=LAYERS, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
            decoder_ffn_dim=FFN, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1,
            bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
    if arch == "vit":
        return T.ViTModel, T.ViTConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
            image_size=32, patch_size=8, num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


ARCHITECTURES = [
    "gpt2", "bert", "roberta", "distilbert", "albert", "electra", "deberta-v2", "llama", "mistral", "qwen2",
    "qwen3", "gemma", "gemma2", "phi3", "opt", "gpt-neox", "falcon", "gptj", "bloom", "stablelm", "olmo",
    "starcoder2", "t5", "bart", "vit",
]

ENCODER_DECODER = {"t5", "bart"}

# every model has LAYERS layers (ALBERT: LAYERS applications of one shared layer); one self-attention
# per layer, and for encoder-decoders encoder self + decoder self + decoder cross per layer
EXPECTED_ATTENTION_SITES = {a: (3 * LAYERS if a in ENCODER_DECODER else LAYERS) for a in ARCHITECTURES}


def build(arch: str) -> torch.nn.Module:
    """The tiny model for ARCH: random weights (seeded), eager attention, eval mode."""
    cls, config = _config(arch)
    torch.manual_seed(SEED)
    model = cls._from_config(config, attn_implementation="eager")
    return model.eval()


def main_output(out) -> torch.Tensor:
    """The output tensor a test compares: logits for LM heads, last_hidden_state for base models.

    Accepts a transformers ModelOutput, or the dict/tuple a captured program returns.
    """
    for key in ("logits", "last_hidden_state"):
        if isinstance(out, dict) and key in out:
            return out[key]
        if hasattr(out, key) and getattr(out, key) is not None:
            return getattr(out, key)
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(f"no logits / last_hidden_state in output of type {type(out).__name__}")
