"""Hugging Face transformers models from tiny configs (random init, no download).

The configs keep every default other than sizes: dropout probabilities, ``use_cache``,
SpecAugment masking and the rest are what a user gets from ``XConfig(...)``. Inputs are
passed the way a user's script passes them: decoder LLMs ``model(input_ids,
attention_mask=...)``, encoders ``model(**tokenizer_output)`` (keywords only), vision and
audio models their pixel or waveform tensor.
"""
from __future__ import annotations

from typing import Any

from tests.zoo.cases import Case, Entry, Floats, Mask, Tokens, torchvision_shim

VOCAB, SEQ = 96, 8
_LM = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=64)
_BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)


def _build(config_name: str, model_name: str, config: dict[str, Any]):
    torchvision_shim()  # transformers imports torchvision when it is installed
    import transformers

    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
    try:  # transformers' own pytree registration of its cache classes: outputs flatten as torch.export sees them
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model

        register_cache_pytrees_for_model(model)
    except ImportError:
        pass
    return model


def decoder(config_name: str, model_name: str, **config) -> Entry:
    """``model(input_ids, attention_mask=mask)``, as a causal-LM training loop calls it."""
    return Entry("huggingface", lambda: Case(_build(config_name, model_name, config), (Tokens(VOCAB),),
                                             {"attention_mask": Mask()}, seq=SEQ), "transformers")


def encoder(config_name: str, model_name: str, **config) -> Entry:
    """``model(**tokenizer(texts, padding=True))``: input_ids and attention_mask by keyword."""
    return Entry("huggingface", lambda: Case(_build(config_name, model_name, config), (),
                                             {"input_ids": Tokens(VOCAB), "attention_mask": Mask()}, seq=SEQ),
                 "transformers")


def seq2seq(config_name: str, model_name: str, **config) -> Entry:
    """A translation/summarization step: source ids and mask, and the decoder's input ids."""
    return Entry("huggingface", lambda: Case(_build(config_name, model_name, config), (),
                                             {"input_ids": Tokens(VOCAB), "attention_mask": Mask(),
                                              "decoder_input_ids": Tokens(VOCAB)}, seq=SEQ), "transformers")


def vision(config_name: str, model_name: str, size: int = 32, **config) -> Entry:
    return Entry("huggingface", lambda: Case(_build(config_name, model_name, {"image_size": size, **config}),
                                             (Floats(("B", 3, size, size)),)), "transformers")


def audio(config_name: str, model_name: str, samples: int = 400, **config) -> Entry:
    """Raw waveform in (wav2vec2/HuBERT), as a CTC fine-tuning loop calls it."""
    return Entry("huggingface", lambda: Case(_build(config_name, model_name, config),
                                             (Floats(("B", samples), scale=0.1),)), "transformers")


def whisper() -> Entry:
    config = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                  max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, decoder_start_token_id=1)
    # Whisper's encoder takes exactly 2 * max_source_positions frames.
    return Entry("huggingface", lambda: Case(_build("WhisperConfig", "WhisperForConditionalGeneration", config),
                                             (Floats(("B", 16, 32)),), {"decoder_input_ids": Tokens(VOCAB)},
                                             seq=SEQ), "transformers")


_CONV_AUDIO = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                   num_conv_pos_embedding_groups=4)

HUGGINGFACE = {
    # decoder LLMs
    "hf/llama": decoder("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2, **_LM),
    "hf/qwen2": decoder("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2, **_LM),
    "hf/mistral": decoder("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, sliding_window=4, **_LM),
    "hf/gemma": decoder("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=2, head_dim=8, **_LM),
    "hf/phi": decoder("PhiConfig", "PhiForCausalLM", **_LM),
    "hf/mixtral": decoder("MixtralConfig", "MixtralForCausalLM", num_key_value_heads=2, num_local_experts=4,
                          num_experts_per_tok=2, **_LM),
    "hf/gpt2": decoder("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                       n_positions=64, bos_token_id=1, eos_token_id=2),
    "hf/gpt_neox": decoder("GPTNeoXConfig", "GPTNeoXForCausalLM", **_LM),
    "hf/opt": decoder("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=32,
                      ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
    "hf/bloom": decoder("BloomConfig", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    "hf/falcon": decoder("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4),
    # encoders
    "hf/bert": encoder("BertConfig", "BertForSequenceClassification", **_BERT),
    "hf/roberta": encoder("RobertaConfig", "RobertaForMaskedLM", pad_token_id=1, **_BERT),
    "hf/distilbert": encoder("DistilBertConfig", "DistilBertForSequenceClassification", vocab_size=VOCAB, dim=32,
                             n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64),
    "hf/electra": encoder("ElectraConfig", "ElectraForSequenceClassification", embedding_size=16, **_BERT),
    "hf/albert": encoder("AlbertConfig", "AlbertModel", embedding_size=16, **_BERT),
    "hf/deberta_v2": encoder("DebertaV2Config", "DebertaV2ForSequenceClassification", **_BERT),
    "hf/longformer": encoder("LongformerConfig", "LongformerModel", attention_window=4, pad_token_id=1, **_BERT),
    # encoder-decoders
    "hf/t5": seq2seq("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                     num_layers=2, num_heads=4),
    "hf/bart": seq2seq("BartConfig", "BartForConditionalGeneration", vocab_size=VOCAB, d_model=32, encoder_layers=2,
                       decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                       decoder_ffn_dim=64, max_position_embeddings=64),
    "hf/marian": seq2seq("MarianConfig", "MarianMTModel", vocab_size=VOCAB, d_model=32, encoder_layers=2,
                         decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, decoder_start_token_id=0),
    "hf/m2m100": seq2seq("M2M100Config", "M2M100ForConditionalGeneration", vocab_size=VOCAB, d_model=32,
                         encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                         encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
    # audio
    "hf/wav2vec2": audio("Wav2Vec2Config", "Wav2Vec2ForCTC", **_CONV_AUDIO),
    "hf/wavlm": audio("WavLMConfig", "WavLMForCTC", num_buckets=32, max_bucket_distance=64, **_CONV_AUDIO),
    "hf/wav2vec2_conformer": audio("Wav2Vec2ConformerConfig", "Wav2Vec2ConformerForCTC", conv_depthwise_kernel_size=3,
                                   **_CONV_AUDIO),
    "hf/whisper": whisper(),
    # vision
    "hf/vit": vision("ViTConfig", "ViTForImageClassification", patch_size=8, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, num_labels=10),
    "hf/deit": vision("DeiTConfig", "DeiTForImageClassificationWithTeacher", patch_size=8, hidden_size=32,
                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=10),
    "hf/swin": vision("SwinConfig", "SwinForImageClassification", size=32, patch_size=2, embed_dim=16,
                      depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=10),
    "hf/convnext": vision("ConvNextConfig", "ConvNextForImageClassification", num_stages=2, hidden_sizes=[16, 32],
                          depths=[1, 1], num_labels=10),
    "hf/resnet": vision("ResNetConfig", "ResNetForImageClassification", embedding_size=16, hidden_sizes=[16, 32],
                        depths=[1, 1], num_labels=10),
    "hf/segformer": vision("SegformerConfig", "SegformerForSemanticSegmentation", size=32, num_encoder_blocks=2,
                           depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
                           strides=[4, 2], num_attention_heads=[1, 2], decoder_hidden_size=32, num_labels=10),
    "hf/mobilevit": vision("MobileViTConfig", "MobileViTForImageClassification", size=64,
                           hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=10),
}
