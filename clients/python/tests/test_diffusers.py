"""ferry.torch with a real diffusers pipeline: a tiny Stable Diffusion (UNet, VAE, CLIP text
encoder) built from configs here, saved with ``save_pretrained`` into a folder under ferryd's
model root, then run twice with the same seed: with its own weights, and with modules built
under ``ferry.torch.empty_weights()`` attached to ferry in each residency policy. The images
must be identical.

Needs torch, diffusers and transformers (tests/python_client.rs runs it only when all three
import), FERRY_SOCKET and FERRY_MODEL_ROOT (see test_torch.py). Nothing is downloaded.
"""

import os
import shutil
import tempfile
import unittest
import warnings

import _util  # puts the package on sys.path
import ferry

os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import ferry.torch as ft
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

SOCKET = os.environ.get("FERRY_SOCKET")
ROOT = os.environ.get("FERRY_MODEL_ROOT")
LIVE = torch is not None and bool(SOCKET and ROOT)
assert _util.PACKAGE_ROOT

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
            attention_head_dim=2, norm_num_groups=4)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
           norm_num_groups=4, down_block_types=("DownEncoderBlock2D",),
           up_block_types=("UpDecoderBlock2D",), sample_size=16)
TEXT = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=8, vocab_size=16, eos_token_id=2, bos_token_id=1,
            pad_token_id=0)


def build():
    unet = UNet2DConditionModel(**UNET).eval()
    vae = AutoencoderKL(**VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(**TEXT)).eval()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def generate(pipe):
    ids = torch.tensor([[1, 5, 7, 9, 3, 2, 0, 0]])  # no tokenizer: ids straight in
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
        return pipe(prompt_embeds=emb, negative_prompt_embeds=torch.zeros_like(emb),
                    num_inference_steps=2, height=16, width=16, output_type="pt",
                    generator=torch.Generator().manual_seed(1)).images


@unittest.skipUnless(LIVE, "needs torch, diffusers, transformers, FERRY_SOCKET, "
                           "FERRY_MODEL_ROOT")
class TinyStableDiffusion(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="sd-", dir=ROOT)
        cls.folder = os.path.join(cls.dir, "sd-tiny")
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = build()
            ref.set_progress_bar_config(disable=True)
            ref.save_pretrained(cls.folder)
            cls.want = generate(ref)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir)

    def setUp(self):
        self.client = ferry.Client(SOCKET, timeout=60)
        self.addCleanup(self.client.close)

    def test_every_policy_gives_the_same_image(self):
        for policy, kw in [("none", {}), ("component", {}), ("sequential", {"lookahead": 2}),
                           ("balanced", {"threshold": 0.002}), ("lru", {"threshold": 0.002})]:
            with self.subTest(policy=policy, **kw):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with ft.empty_weights():
                        pipe = build()
                pipe.set_progress_bar_config(disable=True)
                self.assertTrue(pipe.unet.conv_in.weight.is_meta)
                with ft.attach_pipeline(pipe, self.folder, self.client, policy=policy,
                                        **kw) as session:
                    self.assertEqual(sorted(a.component for a in session.attachments),
                                     ["text_encoder", "unet", "vae"])
                    self.assertEqual(pipe.device.type, "cpu")  # "cpu" placeholders
                    vae = [a for a in session.attachments if a.component == "vae"][0]
                    self.assertIn("decoder.up_blocks.0", vae.hooked)
                    got = generate(pipe)
                    self.assertTrue(torch.equal(got, self.want))
                mine = [c for c in self.client.list_clients()
                        if c.id == self.client.client_id][0]
                self.assertEqual(mine.leases, 0)


if __name__ == "__main__":
    unittest.main()
