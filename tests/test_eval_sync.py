"""The lip-sync score of omnisync_core/eval/sync.py on real re-voicing problems, with a random tiny model."""

import shutil

import pytest
import torch

from omnisync_core.audio.whisper import WhisperEncoder, WhisperEncoderConfig
from omnisync_core.eval.sync import held_out_clips, pearson, score
from omnisync_core.face.analyze import FaceAnalyzer
from omnisync_core.generator import SamplerOptions
from omnisync_core.model.dit import OmniSyncDiT, get_config
from omnisync_core.model.pixel_codec import PixelCodec
from omnisync_core.train.synthetic import SENTENCES, measure_openness


def test_pearson():
    a = torch.arange(10.0)
    assert pearson(a, 3 * a + 1) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    assert abs(pearson(torch.tensor([1.0, -1, 1, -1]), torch.tensor([1.0, 1, -1, -1]))) < 1e-12


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_score_on_a_revoiced_held_out_face():
    torch.manual_seed(0)
    encoder = WhisperEncoder(WhisperEncoderConfig(d_model=32, n_heads=2, n_layers=1)).eval()
    clips = held_out_clips(1, encoder, FaceAnalyzer(), SENTENCES[32:], crop_size=32, render_size=96)
    clip = clips[0]
    n = clip.crops.shape[0]
    assert clip.crops.shape == (n, 32, 32, 3) and clip.audio.shape == (n, 5, 32) and n > 20
    # the face pipeline's crop and mouth position read the source mouth back: it follows sentence A
    assert pearson(measure_openness(clip.crops, clip.mouth_xy, clip.face_width), clip.source_openness) > 0.5

    codec = PixelCodec(spatial_factor=4, scale=0.5)
    dit = OmniSyncDiT(get_config("tiny", in_dim=48, out_dim=48, audio_dim=32, temporal_compression=1)).eval()
    dit.set_text_context(torch.zeros(1, dit.config.text_len, dit.config.text_dim))
    result = score(dit, codec, clips, SamplerOptions(steps=4, shift=3.0), window=9)
    assert -1 <= result.corr_generated <= 1 and len(result.per_clip) == 1
    # the leak check is the source mouth against the new audio, whatever the model does
    src = measure_openness(clip.crops, clip.mouth_xy, clip.face_width)
    assert result.corr_source == pytest.approx(pearson(src, clip.new_openness))
    assert result.model_calls_per_window > 0 and result.seconds_per_frame > 0
    assert 0 < result.psnr_outside_mouth < 100
