"""The field's encoders one flag away: ``timm:nfnet_l0`` (2304-d pooled NFNet-L0 features) and an
``hf:`` BERT with [CLS] pooling, tested offline with randomly initialised weights of the same
architectures (a saved timm checkpoint; a small ``BertConfig`` with its own vocabulary)."""
import pytest
import torch
from PIL import Image

from datasets.encoders import get_encoder


def test_nfnet_l0_from_a_checkpoint_gives_2304_d_features(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("nfnet_l0", pretrained=False, num_classes=0)
    ckpt = tmp_path / "nfnet_l0.pth"
    torch.save(model.state_dict(), ckpt)
    enc = get_encoder(f"timm:nfnet_l0@{ckpt}", "image")
    assert enc.dim == 2304 and enc.modality == "image" and str(ckpt) not in enc.key  # the key holds the weights' digest
    net, batch = enc.load()
    net.eval()
    ims = [Image.new("RGB", (64, 48), (200, 10, 10)), Image.new("RGB", (224, 224), (0, 90, 30))]
    with torch.no_grad():
        out = batch(net, ims, "cpu")
    assert out.shape == (2, 2304) and torch.isfinite(out).all() and not torch.allclose(out[0], out[1])


def tiny_bert(path):
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "runs", "on", "the", "grass", "two", "men"]
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(path)
    return path


def test_an_hf_bert_with_cls_pooling_gives_the_first_tokens_state(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    path = tiny_bert(tmp_path / "bert")
    texts = ["a dog runs on the grass", "two men"]
    cls, mean = get_encoder(f"hf:{path}@cls", "text"), get_encoder(f"hf:{path}", "text")
    assert cls.dim == mean.dim == 32 and cls.key != mean.key and "clspool" in cls.key and "meanpool" in mean.key
    tok, ref = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        enc = tok(texts, padding=True, return_tensors="pt")
        hidden = ref(**enc).last_hidden_state
        m, fc = cls.load()
        got = fc(m.eval(), texts, "cpu")
        m2, fm = mean.load()
        got_mean = fm(m2.eval(), texts, "cpu")
    assert torch.allclose(got, hidden[:, 0], atol=1e-6)
    w = enc["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(got_mean, (hidden * w).sum(1) / w.sum(1), atol=1e-6)
    assert not torch.allclose(got, got_mean)
