"""The model zoo: real-world architectures at random init and tiny inputs (CPU-sized).

Each entry is ``name -> (family, factory)``; a factory returns ``(model, args, kwargs)``. The
torchvision import shim registers the two compiled-op schemas the CPU torch lacks (test support
only, never the library).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


@functools.cache
def torchvision_shim() -> None:
    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        torchvision_shim.lib = lib  # keep the registration alive
    except RuntimeError:
        pass  # already defined in this process


def _images(n=2, size=64):
    return (torch.randn(n, 3, size, size),)


def timm_model(name: str, size: int = 64, **kwargs):
    def make():
        torchvision_shim()
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval(), _images(size=size), {}
    return make


def tv_model(name: str, size: int = 64, **kwargs):
    def make():
        torchvision_shim()
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs).eval(), _images(size=size), {}
    return make


def hf_model(config_name: str, model_name: str, **config):
    def make():
        torchvision_shim()  # transformers imports torchvision when it is installed
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        model = getattr(transformers, model_name)(cfg).eval()
        if "image_size" in config:
            return model, (torch.randn(2, 3, config["image_size"], config["image_size"]),), {}
        ids = torch.randint(0, config.get("vocab_size", 128), (2, 12))
        # Encoder-decoders build a cache object unless told not to, whatever the config says.
        kwargs = {"decoder_input_ids": ids, "use_cache": False} if model_name.startswith(("T5", "Bart")) else {}
        return model, (ids,), kwargs
    return make


_TINY_LM = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)


# ---------------------------------------------------------------------- hand-written awkward models
class FunctionalRaw(nn.Module):
    """F.linear with raw Parameters, matmul with a parameter."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 8) * 0.3), nn.Parameter(torch.zeros(16))
        self.w2 = nn.Parameter(torch.randn(16, 4) * 0.3)

    def forward(self, x):
        return torch.relu(F.linear(x, self.w1, self.b1)) @ self.w2


class TiedEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(50, 16), nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)))


class DataDependent(nn.Module):
    """Python control flow on tensor values: no graph can be captured."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        if h.mean() > 0:
            h = torch.relu(h)
        return self.b(h)


class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, *, scale: float = 2.0):
        return self.fc(x) * scale


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.fc1(x)
        h.relu_()
        h += 1.0
        return self.fc2(h)


class LSTMTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lstm, self.out = nn.Embedding(30, 8), nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 5)

    def forward(self, idx):
        h, _ = self.lstm(self.emb(idx))
        return self.out(h)


class AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(16, 4, batch_first=True), nn.Linear(16, 4)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(h)


class GroupedDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1)
        self.grouped, self.bn = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)

    def forward(self, x):
        return self.bn(self.grouped(self.pw(self.dw(x)))).mean((2, 3))


def _hand(cls, *args, **kwargs):
    return lambda: (cls().eval(), args, kwargs)


ZOO = {
    # timm
    "timm/resnet18": ("timm", timm_model("resnet18")),
    "timm/mobilenetv3_small_050": ("timm", timm_model("mobilenetv3_small_050")),
    "timm/efficientnet_b0": ("timm", timm_model("efficientnet_b0")),
    "timm/convnext_atto": ("timm", timm_model("convnext_atto")),
    "timm/vit_tiny_patch16_224": ("timm", timm_model("vit_tiny_patch16_224", size=64, img_size=64)),
    "timm/deit_tiny_patch16_224": ("timm", timm_model("deit_tiny_patch16_224", size=64, img_size=64)),
    "timm/regnetx_002": ("timm", timm_model("regnetx_002")),
    "timm/efficientnetv2_rw_t": ("timm", timm_model("efficientnetv2_rw_t")),
    "timm/mobilevit_xxs": ("timm", timm_model("mobilevit_xxs")),
    "timm/ghostnet_050": ("timm", timm_model("ghostnet_050")),
    # torchvision
    "tv/resnet18": ("torchvision", tv_model("resnet18")),
    "tv/mobilenet_v2": ("torchvision", tv_model("mobilenet_v2")),
    "tv/mobilenet_v3_small": ("torchvision", tv_model("mobilenet_v3_small")),
    "tv/squeezenet1_0": ("torchvision", tv_model("squeezenet1_0")),
    "tv/shufflenet_v2_x0_5": ("torchvision", tv_model("shufflenet_v2_x0_5")),
    "tv/efficientnet_b0": ("torchvision", tv_model("efficientnet_b0")),
    "tv/regnet_x_400mf": ("torchvision", tv_model("regnet_x_400mf")),
    "tv/mnasnet0_5": ("torchvision", tv_model("mnasnet0_5")),
    "tv/googlenet": ("torchvision", tv_model("googlenet", aux_logits=False, init_weights=True)),
    "tv/inception_v3": ("torchvision", tv_model("inception_v3", size=96, aux_logits=False, init_weights=True)),
    # Hugging Face tiny configs
    "hf/llama": ("huggingface", hf_model("LlamaConfig", "LlamaForCausalLM", **_TINY_LM)),
    "hf/qwen2": ("huggingface", hf_model("Qwen2Config", "Qwen2ForCausalLM", **_TINY_LM)),
    "hf/gpt2": ("huggingface", hf_model("GPT2Config", "GPT2LMHeadModel", vocab_size=128, n_embd=32, n_layer=2,
                                        n_head=4, n_positions=64)),
    "hf/bert": ("huggingface", hf_model("BertConfig", "BertModel", vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)),
    "hf/vit": ("huggingface", hf_model("ViTConfig", "ViTForImageClassification", image_size=32, patch_size=8,
                                       hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, num_labels=10)),
    "hf/t5": ("huggingface", hf_model("T5Config", "T5ForConditionalGeneration", vocab_size=128, d_model=32, d_kv=8,
                                      d_ff=64, num_layers=2, num_heads=4)),
    # hand-written
    "hand/functional_raw_params": ("research code", _hand(FunctionalRaw, torch.randn(2, 8))),
    "hand/tied_embeddings": ("research code", _hand(TiedEmbeddings, torch.randint(0, 50, (2, 6)))),
    "hand/data_dependent_control_flow": ("research code", _hand(DataDependent, torch.randn(2, 8))),
    "hand/keyword_only_forward": ("research code", _hand(KeywordOnly, torch.randn(2, 8), scale=3.0)),
    "hand/inplace_ops": ("research code", _hand(InPlace, torch.randn(2, 8))),
    "hand/lstm": ("research code", _hand(LSTMTagger, torch.randint(0, 30, (2, 7)))),
    "hand/multihead_attention": ("research code", _hand(AttentionBlock, torch.randn(2, 5, 16))),
    "hand/grouped_depthwise_conv": ("research code", _hand(GroupedDepthwise, torch.randn(2, 8, 12, 12))),
}
