"""timm and torchvision models as a user builds them: random init, the training recipe's
dropout and drop-path rates, small images (CPU-sized), 10 classes."""
from __future__ import annotations

from tests.zoo.cases import Case, Entry, Floats, torchvision_shim


def _images(size: int) -> tuple[Floats, ...]:
    return (Floats(("B", 3, size, size)),)


def timm_model(name: str, size: int = 64, **kwargs) -> Entry:
    def build() -> Case:
        torchvision_shim()
        import timm

        return Case(timm.create_model(name, pretrained=False, num_classes=10, **kwargs), _images(size))
    return Entry("timm", build, "timm")


def tv_model(name: str, size: int = 64, **kwargs) -> Entry:
    def build() -> Case:
        torchvision_shim()
        import torchvision

        return Case(getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs), _images(size))
    return Entry("torchvision", build, "torchvision")


def tv_class(module: str, cls: str, size: int, **kwargs) -> Entry:
    """A torchvision architecture class with a tiny configuration (the named builders fix
    ImageNet-sized widths)."""
    def build() -> Case:
        torchvision_shim()
        import importlib

        model_cls = getattr(importlib.import_module(f"torchvision.models.{module}"), cls)
        built = {k: v() if callable(v) else v for k, v in kwargs.items()}
        return Case(model_cls(num_classes=10, **built), _images(size))
    return Entry("torchvision", build, "torchvision")


def tv_segmentation(name: str, size: int = 64) -> Entry:
    """A torchvision segmentation builder (its output: an OrderedDict of masks)."""
    def build() -> Case:
        torchvision_shim()
        import torchvision

        model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=10)
        return Case(model, _images(size))
    return Entry("torchvision", build, "torchvision")


def _convnext_blocks():
    from torchvision.models.convnext import CNBlockConfig

    return [CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)]


# Recipe settings: the rates timm's training recipes use for these families (EfficientNet and
# MobileNet drop 0.2 with drop path 0.2; ConvNeXt, DeiT, Swin and MaxViT drop path 0.1; none for
# ResNet-18, RegNet, DenseNet).
TIMM = {
    "timm/resnet18": timm_model("resnet18"),
    "timm/efficientnet_b0": timm_model("efficientnet_b0", size=32, drop_rate=0.2, drop_path_rate=0.2),
    "timm/mobilenetv3_large_100": timm_model("mobilenetv3_large_100", size=32, drop_rate=0.2, drop_path_rate=0.2),
    "timm/mobilenetv4_conv_small_050": timm_model("mobilenetv4_conv_small_050", drop_rate=0.2),
    "timm/regnety_002": timm_model("regnety_002"),
    "timm/densenet121": timm_model("densenet121", size=32, block_config=(2, 2, 2, 2)),  # 4 dense blocks of 2
    "timm/fastvit_t8": timm_model("fastvit_t8"),
    "timm/convnext_atto": timm_model("convnext_atto", drop_path_rate=0.1),
    "timm/deit_tiny_patch16_224": timm_model("deit_tiny_patch16_224", img_size=64, drop_path_rate=0.1),
    "timm/swin_tiny_patch4_window7_224": timm_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4,
                                                    embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                                                    drop_path_rate=0.1),
    "timm/maxvit_pico_rw_256": timm_model("maxvit_pico_rw_256", img_size=64, drop_path_rate=0.1),
    "timm/mobilevit_xxs": timm_model("mobilevit_xxs"),
    "timm/ghostnet_050": timm_model("ghostnet_050", drop_rate=0.2),
    "timm/efficientvit_b0": timm_model("efficientvit_b0"),
    # Attention within mask units: 5-D scaled_dot_product_attention.
    "timm/hiera_tiny_224": timm_model("hiera_tiny_224", img_size=64, drop_path_rate=0.1),
}

TORCHVISION = {
    "tv/resnet18": tv_model("resnet18"),
    "tv/mobilenet_v2": tv_model("mobilenet_v2"),
    "tv/mobilenet_v3_small": tv_model("mobilenet_v3_small"),
    "tv/shufflenet_v2_x0_5": tv_model("shufflenet_v2_x0_5"),
    "tv/mnasnet0_5": tv_model("mnasnet0_5"),
    "tv/squeezenet1_1": tv_model("squeezenet1_1"),
    "tv/efficientnet_b0": tv_model("efficientnet_b0", size=32),
    "tv/regnet_y_400mf": tv_model("regnet_y_400mf"),
    # The builders' defaults: aux classifiers on (their outputs change with the mode).
    "tv/googlenet": tv_model("googlenet", size=64, init_weights=True),
    # Its aux classifier needs 299-pixel inputs (too slow here): off.
    "tv/inception_v3": tv_model("inception_v3", size=96, aux_logits=False, init_weights=True),
    "tv/vit_tiny": tv_class("vision_transformer", "VisionTransformer", 32, image_size=32, patch_size=8,
                            num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64),
    "tv/swin_tiny": tv_class("swin_transformer", "SwinTransformer", 64, patch_size=[4, 4], embed_dim=24,
                             depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], stochastic_depth_prob=0.2),
    "tv/convnext_tiny": tv_class("convnext", "ConvNeXt", 64, block_setting=_convnext_blocks,
                                 stochastic_depth_prob=0.1),
    "tv/deeplabv3_mobilenet_v3_large": tv_segmentation("deeplabv3_mobilenet_v3_large"),
}
