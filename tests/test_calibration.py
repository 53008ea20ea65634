"""Calibration metrics and test-time scaling (eval/calibration.py)."""

import base64
import json
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from eval import calibration as cal


# ---------------------------------------------------------------------------
# Brute-force references (independent, loop-based)

def ref_ece(q, c, n_bins=10):
  """Loop over bins with explicit edge tests; edges are np.linspace, outer ones open."""
  edges = np.linspace(0, 1, n_bins + 1)
  total = 0.0
  for b in range(n_bins):
    lo = -np.inf if b == 0 else edges[b]
    hi = np.inf if b == n_bins - 1 else edges[b + 1]
    members = [i for i in range(len(q)) if lo <= q[i] < hi]
    if members:
      conf = sum(q[i] for i in members) / len(members)
      acc = sum(c[i] for i in members) / len(members)
      total += len(members) / len(q) * abs(conf - acc)
  return total


def ref_auroc(q, c):
  """P(q_pos > q_neg) + 0.5 P(tie) by enumerating all positive/negative pairs."""
  pos = [qi for qi, ci in zip(q, c) if ci]
  neg = [qi for qi, ci in zip(q, c) if not ci]
  if not pos or not neg:
    return 0.5
  wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
  return wins / (len(pos) * len(neg))


def ref_roc_trapezoid(q, c):
  """Area under the ROC polyline through all distinct thresholds (sklearn's construction)."""
  q, c = np.asarray(q, float), np.asarray(c, bool)
  pts = [(0.0, 0.0)]
  for t in sorted(set(q.tolist()), reverse=True):
    pred = q >= t
    pts.append(((pred & ~c).sum() / (~c).sum(), (pred & c).sum() / c.sum()))
  return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))


# ---------------------------------------------------------------------------
# Hand-computed values

def test_hand_values():
  q = np.array([0.9, 0.9, 0.2, 0.6])
  c = np.array([1, 0, 0, 1])
  assert cal.accuracy(c) == 0.5
  assert cal.brier_score(q, c) == pytest.approx((0.01 + 0.81 + 0.04 + 0.16) / 4, abs=1e-15)
  # bins: {0.2} -> |0.2-0|; {0.6} -> |0.6-1| (0.6 sits below edge 0.6000000000000001 -> bin 5);
  # {0.9, 0.9} -> |0.9-0.5|
  assert cal.ece(q, c) == pytest.approx(0.25 * 0.2 + 0.25 * 0.4 + 0.5 * 0.4, abs=1e-15)
  # pairs (pos, neg): (0.9,0.9)=.5 (0.9,0.2)=1 (0.6,0.9)=0 (0.6,0.2)=1 -> 2.5/4
  assert cal.auroc(q, c) == 0.625
  m = cal.calibration_metrics(q, c)
  assert m["n"] == 4 and m["mean_confidence"] == pytest.approx(0.65) and m["auroc"] == 0.625


def test_ece_tie_rule_and_open_outer_edges():
  # Interior edge 0.5 is exact: 0.5 goes to the upper bin -> separate bins.
  assert cal.ece([0.45, 0.5], [1, 0]) == pytest.approx(0.5 * 0.55 + 0.5 * 0.5, abs=1e-15)
  # The float64 edge for 0.7 is 0.7000000000000001, so 0.7 shares bin 6 with 0.65.
  assert cal.ece([0.65, 0.7], [1, 0]) == pytest.approx(abs(0.675 - 0.5), abs=1e-15)
  assert cal.ece([0.3, 0.25], [1, 0]) == pytest.approx(abs(0.275 - 0.5), abs=1e-15)
  assert cal.ece([0.8, 0.75], [1, 0]) == pytest.approx(0.5 * 0.2 + 0.5 * 0.75, abs=1e-15)
  b = cal.ece_bins([0.0, 1.0, 0.05, 0.95, 0.1], [0, 1, 0, 1, 1])
  np.testing.assert_array_equal(b.count, [2, 1, 0, 0, 0, 0, 0, 0, 0, 2])
  assert np.isnan(b.mean_conf[2]) and b.accuracy[9] == 1.0
  assert cal.ece([0.0, 1.0], [0, 1]) == 0.0


def test_perfectly_calibrated_grid_has_zero_ece():
  q = np.repeat([0.25, 0.5, 0.75], 4)
  c = np.array([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0])
  assert cal.ece(q, c) == pytest.approx(0.0, abs=1e-15)


def test_auroc_edge_cases():
  assert cal.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
  assert cal.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
  assert cal.auroc([0.7] * 5, [1, 0, 1, 0, 0]) == 0.5          # all tied
  assert cal.auroc([0.1, 0.7, 0.9], [1, 1, 1]) == 0.5          # one class absent
  assert cal.auroc([0.1, 0.7, 0.9], [False] * 3) == 0.5


# ---------------------------------------------------------------------------
# Against the brute-force references

@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 0.6, 0.7, 0.9, 1.0])
                          | st.floats(0, 1), st.booleans()), min_size=1, max_size=40))
def test_metrics_match_brute_force(pairs):
  q = [p[0] for p in pairs]
  c = [p[1] for p in pairs]
  assert cal.ece(q, c) == pytest.approx(ref_ece(q, c), abs=1e-12)
  assert cal.auroc(q, c) == pytest.approx(ref_auroc(q, c), abs=1e-12)
  if any(c) and not all(c):
    assert cal.auroc(q, c) == pytest.approx(ref_roc_trapezoid(q, c), abs=1e-12)
  assert cal.brier_score(q, c) == pytest.approx(sum((a - b) ** 2 for a, b in zip(q, c)) / len(q),
                                                abs=1e-12)


@pytest.mark.parametrize("n_bins", [1, 3, 10, 15])
def test_ece_other_bin_counts(n_bins):
  rng = np.random.default_rng(n_bins)
  q = np.round(rng.uniform(size=300), 2)
  c = rng.uniform(size=300) < q
  assert cal.ece(q, c, n_bins) == pytest.approx(ref_ece(q, c, n_bins), abs=1e-12)
  assert cal.ece_bins(q, c, n_bins).count.sum() == 300


# ---------------------------------------------------------------------------
# The authors' released evaluation outputs (damanimehul/RLCR eval_outputs/Hotpot-models/*):
# per-sample confidences and 0/1 evals of three models on three OOD sets, and the numbers of
# results/Hotpot-models/*/metrics.json (accuracy, brier_score, ece, auroc), which the authors
# computed with sklearn + np.digitize. Stored as base64(zlib(json)) {"set/model": [conf, evals]}.

RELEASED_METRICS = {
    "gpqa/Base": (0.3950892857142857, 0.5035332589285714, 0.5094419642857144, 0.4920361915483561),
    "gpqa/RLVR": (0.3950892857142857, 0.6049107142857143, 0.6049107142857143, 0.5),
    "gpqa/RLCR": (0.41517857142857145, 0.266725, 0.15500000000000008, 0.5496798818025117),
    "commonsenseqa/Base": (0.8861588861588862, 0.0986977886977887, 0.003685503685503741, 0.6204902990731259),
    "commonsenseqa/RLVR": (0.9082719082719083, 0.09172809172809172, 0.09172809172809171, 0.5),
    "commonsenseqa/RLCR": (0.9131859131859131, 0.16731072891072893, 0.30239148239148245, 0.7279719096370251),
    "math-500/Base": (0.468, 0.484505, 0.49209999999999987, 0.5909565580618211),
    "math-500/RLVR": (0.386, 0.6103599999999999, 0.6112, 0.5023121972624935),
    "math-500/RLCR": (0.454, 0.251445, 0.1879, 0.7156653918768455),
}

_RELEASED_B64 = (
    "eNrtXU2TJDkN/S97bha5MmUrOcKV0xy4TMxhgtiAy7AQy43gvzPdUx+2/J7srK4aIDZ31l2VWZm2LMmybMnSv374"
    "y9//8fm3v//8y08//O7jR/lx05f0o7y8fbn9+XbLXi8uRc9frHnBLl+ai/pFc6V97Vrt9uJhsebnFsxruQFqvg/t"
    "28GtvtYb5AhahS1Wd2AnHP4qDOug+1rD02AToMQcahhKDCOjI6H5ul5vFAdBQ1+PRYVcxEDrGbAnlHUPKmCRcxWK"
    "qNpjzWPLMHu04BHm8Ky/AfQY40HXc4jWEV9fXzCEVzdmOqZDtDI4xG/YogMpGkRb9zoQLhAzHrGdxFLIhVXt5y+E"
    "GrdfzV1vBLi4t1zSkSFgTHK2AN7uuP8i+erwqJ3kcEjWmPWEImEDPKK0Yy1McIQh0sFu1q1thG+74YwGf8SPSHaG"
    "zUIcKpCRFypdeoomi7eLTy8fv/5y/pfOf9Pbt/rv7YlUfabmOsEabp9tTdI82cKQ4FX7i4daANQJvHuD81YwdKl5"
    "P3W/IagTgK3GUtsbIfjzb0v3Xgu5uJ4hLHrYMaQ9lnqcicNwRPtEKJ1cLYwDhdC8xyHrMcJhz1PJtZogjIngE9eM"
    "W+tq+fTp5ZtK/eGPf/rwqlLXY/coRznKUY5ylF9JcRppgnN5IlpN/+lr8npLItpaIppCr7NxHTAF+pw4vSQBDUGg"
    "Loy0KwGw8KcS0M5YqwL1Ygm01RRqghi3CWAL9SMRLQvjvKdGIqsOroMjCLkGLUCPFEALjxGvbQpde6UO1wlo76hW"
    "zC2AgyuN9A8fvm3y6nnPLr9+vl4s1Y3L98tD6/l+XfT8ubrnF/d5ulRyeUCrRnL1YK4aXC5QZQeJv4e+L+C+Vd9z"
    "1VN197O7Pl26clIA6uX6DQf1D+sF/gLaPYG2Fwd3BkhazhWfFGCuruCyu7BUJCrqWi0OKq0qOXmUlJpbqgpKBYVW"
    "zFA/VzPI4hrONZOsFegZMAXC16ljsUs51W0vjonfYLzWFTWUPSsjKqlDy+K6XVe6gPG1LIA4Ciq+Nqo1lU6QdvUA"
    "9Uyb3ZDJNdK0/uIZVQFVC+CSXGF8cZ8F9DBXdoRCJIMhkHPFMdnJJEX4UM93nmoKmNSPFt+V4hgeoUy9YKtHyUld"
    "X9CQy55Ua/XQyctAxKHdwx5AdfQqnkjqWKuTFRlQ2f9mjreXetbwM09xrZdLz9dzTR2z1gN3qU2RDbArYc1bO181"
    "V6YZJqDB4f1Wr9Mkstea4C5XCnQ2pP8koHumcPcK63lYu+31OBnsiiWo5QjZ0Y00X67LJgIb04+Qlp6oxs92fRPd"
    "Ee4plNz6BNcQ7Yn3+EkTe78SYBpTC2EhhRgU0r+Z3X/MSVX9r5rrn3/+8uXnv/3y09f/vZ8CtVUzOy01ynamTVdp"
    "Y0QyYq6c8STQ0EiI7F4Dc6AG1nZme0IWWoWWeQvt5MqwZ/4Ji3w/gBmOOThwPwiDBlfoBzFwAUGwm7PdIYtjjXQD"
    "dun+KcdSkNla3wvC86HBnbinIH6O/zC/HbtM1yO79dYPlQhXzSsdWgMXCzAmrWsR9wvzg7GhwIfELnEUDR9iW95C"
    "+3XIBoS20KBt3OFIIX9r4MOAya6RdwsYAwFOIJFjkhqTPRsCywjfbsxlwtc6NVEo9ySoXW+oQx0VTRFfd3LIqOuJ"
    "DjyxoukIVrZBYUh8drBDGvTI4IKDcO/AhcoGjiPdfKhUQIx9YjQkIXtBY08YVKA7ysDbEKBX8dTGJgXiArRx5QuL"
    "b5sRNoBOihuiUyrrYyQ/qDOX8nk+aINKoJ6jqSbjB2cJtMNOEIOZWCN9y+q5ZRvPkca8zZiCTQZJ81OZmpJs4MbV"
    "9T7gLws9mqmWsY308w61Fg50gsVoTQARuCGXZSoIg/4pZUaN5QsTGtyNd6QXDpZ40GNQ6eju5KDRhUT1Q4nVazIm"
    "56WcstUYFlymY+fqgbZDmWFm1GyUtJsOZs76bon10qll4dDRP1agAukC9TRFOg5eRw9ZoH2j9lUlkskiL++Nrapt"
    "dua1IVtDFTHylh8CxvQH7Hc7OACxxWizSGHlpxzwgEDHJYqi5SuWwkx75FiC3tZEyhpekwU7WbEiuQUbLMNtAEY7"
    "pRNfw7Il2GAzDU8pDdzIjS20glVMXXfZs7XzZqLo/0n3TV7Szn/IYaM3WqSJlmSidf6MdNvme/qA3INSeB3dl4n6"
    "012t7e3THnhl4lkZPhfVLzuglilajmCWnfTaX9+eu3sxIDs5Q0KqSPjs+zluXl7cw7f7uV2mR9/+Fka4nZWn8q6x"
    "fP978/JepqTjfbDL5Gid507ZPWu9h/KPpMiIMjLEnwxmRAmkmzyo5zMzhkziWR40E94jsaWD/T4NCfShN1YfJ4CO"
    "cpSjHOUoRznKUY5ylKMc5ShHOcpRjvLrjQrwyA3xWZOc3GHkum9b9/29wOfCH2EcYLh45ha4DEwr74NEJmgqu7kl"
    "DTa95aEmm9kNenmgmUvu3Eaf43wBZt/5fsnDTTDfZ+zOtCc7x8t+HLHYbo8208pd2JadLgboOXmKyUgeNv/sN6/K"
    "0wxgjzCs3mNifu54k6c8M+JNeSf+3uvU8z7uBjUiw+UlUEwT5cAHYFhc+AMfvMAuB/BLHRAlgzAOBu4pCL7gows0"
    "lfpQGQUENcguSIqBZ4qSyBYsHocOwi2UJkJ227NCguugEBS+I11YhELiUkQoraMnnOpoCQWEVMge74UQ9RpVQ0m/"
    "anxcgzRcny4oGAsKHLKQACSeB4qSMEI5uLYKE3U0E+8b6lG81B1d1HdDg3hKMDoIHIQ6iFHCRoWR4eTvLUpQi0iP"
    "givR0CA+PE0JoMiAXZCw8EFkMrkuLnRR8XFzCsIrDDXSRFwxPzgyGKsLC0azAroU17ZnCkMAn9gIzy4EUmEEayId"
    "FSAxGbmzEx0njYT+CYXdWmogFhbWxcsoG8QhygG7QKZvQjEp4HqdGD7RMwaYBkVTWj3veBpcf1gdLhQM9gUQsJEq"
    "XTCtPAjJZT6GUif3kDDKZGbzLZgX2wVMxWhqQc8bma7RLLkEcZjQNMEksgEUMnUpd1O4IjUn0hbKIGpbBnxhRMNh"
    "wggFv2omilM4LWkwMAoIgsZAQTKoKFJR1T+xIK7y0cPURfjrYsV1YiEDHqJTeIX8BQi37PUmqD9FilUmo6X4AIud"
    "amSk2ZXpxg16FiDU1GtsiuTOVZQYkaE1EIr0oQxC9q0uAF4m8b46rasgMRGFMstOziwaSL2FTMKKmIBOo8VN615i"
    "KxgkCxloiOTqw8350G1I1q5A5lE5d9Jg2adQEHppwnS7TFQwFAoxj7RfC7ReP08XJ/g1WCcWxJdIxLJZLoNopIzp"
    "ooVns0Y30KMuDiCCYnVpgQrSoa7IXYIVHpvl2fNsLsl1vMCRrsgQtwLAVhCA1qsaTFlePfVZTzNYXyhbSoR7B2FA"
    "12jyYJFC8XInnHyJJlIPRJuBmYUL9eRhvLGiSJFoQbOQSkbBQRWJEnVzPlK+ytOMovEZv8cbRZ+3xS13GnFkh2Eh"
    "Nts8tk/y0O3i+fN4497Ly6x5co85e189Ep6gfAwNvs85JLlzhMrUGH602eH+c6PyVPOb3Gl8H2Pve5mA97sg7DvN"
    "+EyTmOwe349zWXifq4A8nCdll1F0xngtT+jHM4zc98RAeOwp3z0ycM6RhRhFv3z+519/oyJRduQu7+ZLlEKZFRyh"
    "xucm1VGVfUbTNmGkAzoAt6tBeeLYKgOpzz8MkdRfcbTc8r823RlihSW43YYxSmdJB/NydnjoEYsSziqshHWroymC"
    "YiabsqfiqNGYcEF/J9krYJaQ+zhcHHs6Qq9CZM/x8+t6j/S5HxgjeRL0A6S37rGOOfYeVHL+71AFe3/Fy4DwEBos"
    "A6JYwBE7DwV4AEgoxGm3Yvk1I7U5P05IWy8c3H2N548R30FRFIwAILHQUHet26gNIgjDyQwiHhIOAj2almlNQ/FD"
    "XmLMes2zxzON4axsCWY4Y76aQsM5oTzAaSLfcJz3QsjCT0iukmjzRoJscTz/H8uOkkBO6QQyquA8MKM8Jwl+TzB/"
    "R4IZ9PCyDOeCHuXBZplHUB4ZBG8cHEimcr/w7Ng4Jx/LhC00FI1M5I8UAn+CWXhYlhg0ThLEGMiB2CxNjhgzR/lv"
    "lkuU2aP8P9NQj/4fvH2U/8Gs2VGuuERyK/NM1SzjdoLZBhPMssxyFXINHufLZtkLsdbPtHmUIXBGm2cZq1mWwwSz"
    "QvMMjSybtdBshTibJF4NpFC/Zdq8QGg4zBjTKHM7zkY4ygAuE9r8OONjgoF159YICQaCjPJ5R9nHE8yjKIE2L502"
    "fzl4RU84NX475hzGLDpKYoELDvak9S72S+VbszI3ycAP1R+qsdrNu/EFtbrrGzs4VNjBGKvc0RaQmhz5gjH/p8Xj"
    "cwFnSxpSdcnPodOqAZ+xzilrBb7r5tnC2BGgzvvZ0MUyOk2k5MzCivy1PE8k5Jb9Wot0TsiZHRXMwMESui8XDVwx"
    "S+0Z2zJ5ZscD2BjJVSZ3A+5rnsAK/FLDA2ELOa9WgsMNDXOsntzRicZmoHfeoNkjbwRQrjZsr6cCEjjYFDl6lk44"
    "hH6N5vJvdwcja+fR9nCSEe/OtmX1mDDiw7/4I7AD387MTngg0ZmZJ7S5FhFe6KmXb61/I1omrS4j59HVDSLkJJvJ"
    "bODPzJTmlF09kk9I3rfiUAfHIi3iI89ThlzOL+lDFieQik/0vgzy1Zs/m3LzG09nCQmWAgmmjY6yduAN4ygnA05M"
    "nchSQuhG73gpwPwsJUw0jbZ7scLJFWackDpRhTvBdO04ujlTfOPlEU7DjRK6Y2UWJRiPYUpBGvG5pUAKlwKJLIVY"
    "iniWvj1Rgw1exkacitOis7GVAhNUIkvLBM0miRopzkuBf/8HIVRPMQ=="
)


@pytest.mark.parametrize("name", sorted(RELEASED_METRICS))
def test_reproduces_released_metrics(name):
  data = json.loads(zlib.decompress(base64.b64decode("".join(_RELEASED_B64))))
  q, c = (np.array(v, dtype=np.float64) for v in data[name])
  m = cal.calibration_metrics(q, c)
  acc, brier, ece, auroc = RELEASED_METRICS[name]
  assert m["accuracy"] == pytest.approx(acc, abs=1e-12)
  assert m["brier"] == pytest.approx(brier, abs=1e-12)
  assert m["ece"] == pytest.approx(ece, abs=1e-12)
  assert m["auroc"] == pytest.approx(auroc, abs=1e-12)


# ---------------------------------------------------------------------------
# Input validation

def test_input_validation():
  with pytest.raises(ValueError, match="conf"):
    cal.ece([0.5, 1.2], [0, 1])
  with pytest.raises(ValueError, match="conf"):
    cal.brier_score([0.5, np.nan], [0, 1])
  with pytest.raises(ValueError, match="conf"):
    cal.auroc([0.5], [0, 1])
  with pytest.raises(ValueError, match="correct"):
    cal.accuracy([0, 2])
  with pytest.raises(ValueError, match="correct"):
    cal.accuracy([])
  with pytest.raises(ValueError, match="correct"):
    cal.accuracy(["yes"])
  with pytest.raises(ValueError, match="n_bins"):
    cal.ece([0.5], [1], n_bins=0)


def test_fill_missing_confidence():
  np.testing.assert_array_equal(cal.fill_missing_confidence([0.5, None, float("nan"), 1.0]),
                                [0.5, 0.0, 0.0, 1.0])
  np.testing.assert_array_equal(cal.fill_missing_confidence([None], fill=0.5), [0.5])
  with pytest.raises(ValueError, match="fill"):
    cal.fill_missing_confidence([None], fill=2.0)


def test_reliability_diagram_writes_png(tmp_path):
  import matplotlib.image

  rng = np.random.default_rng(0)
  q = rng.choice([0.05, 0.3, 0.5, 0.7, 1.0], size=200)    # leaves some bins empty
  c = rng.uniform(size=200) < q
  out = cal.reliability_diagram(q, c, tmp_path / "rel.png", title="synthetic")
  assert out == str(tmp_path / "rel.png")
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  img = matplotlib.image.imread(out)
  assert img.shape[:2] == (400, 750)
  assert img[..., :3].std() > 0.05                       # not a blank canvas
  with pytest.raises(ValueError, match="conf"):
    cal.reliability_diagram([2.0], [1], tmp_path / "bad.png")


# ---------------------------------------------------------------------------
# Test-time scaling

def test_majority_vote_grouping_and_ties():
  assert cal.majority_vote(["3", "4", "3.0", "4"]) == "3"        # 2-2 tie: "3" appeared first
  assert cal.majority_vote(["4", "3", "3.0", "4"]) == "4"
  assert cal.majority_vote(["a", "b", "b"]) == "b"
  assert cal.majority_vote(["The Cat", "cat", "dog"]) == "The Cat"
  assert cal.majority_vote([None, None, "x"]) == "x"
  assert cal.majority_vote([None, None]) is None
  assert cal.majority_vote(["A", "a", "b"], key=str) == "A"      # custom key: case-sensitive tie
  with pytest.raises(ValueError, match="answers"):
    cal.majority_vote([])
  with pytest.raises(TypeError, match="answers"):
    cal.majority_vote("abc")


def test_confidence_weighted_vote_and_max_conf():
  answers = ["a", "b", "b", "c"]
  confs = [0.9, 0.3, 0.4, 0.85]
  assert cal.majority_vote(answers) == "b"
  assert cal.confidence_weighted_vote(answers, confs) == "a"     # a: 0.9 > c: 0.85 > b: 0.7
  assert cal.confidence_weighted_vote(["a", "b", "b"], [0.9, 0.5, 0.5]) == "b"
  assert cal.confidence_weighted_vote(["a", "b"], [0.5, 0.5]) == "a"   # tie -> first
  assert cal.confidence_weighted_vote(["a", "b"], [None, 0.1]) == "b"  # missing conf weighs 0
  assert cal.max_confidence_select(answers, confs) == "a"
  assert cal.max_confidence_select(["a", "b"], [0.7, 0.7]) == "a"
  assert cal.max_confidence_select([None, "b"], [1.0, 0.2]) == "b"
  assert cal.max_confidence_select([None], [1.0]) is None
  with pytest.raises(ValueError, match="confs"):
    cal.max_confidence_select(["a"], [0.5, 0.5])
  with pytest.raises(ValueError, match="confs"):
    cal.confidence_weighted_vote(["a"], [1.5])


def test_compare_selectors_hand_dataset():
  answers = [["1", "2", "2", "2"], ["5", "6", "5", "7"], ["x", "y", "y", "z"]]
  confs = [[0.9, 0.2, 0.2, 0.2], [0.1, 0.9, 0.2, 0.3], [0.2, 0.6, 0.1, 0.9]]
  golds = ["1", "6", "y"]
  out = cal.compare_selectors(answers, confs, golds, ns=(1, 2, 4))
  np.testing.assert_array_equal(out["n"], [1, 2, 4])
  # n=1: first samples "1", "5", "x" -> 1/3 for every method.
  # n=2: majority (ties -> first): "1", "5", "x"; weighted and max-conf: "1", "6", "y".
  # n=4: majority: "2", "5", "y"; weighted: "1" (.9 vs .6), "6" (.9 vs .3, .3), "z" (.9 vs .7);
  #      max-conf: "1", "6", "z".
  np.testing.assert_allclose(out["majority_vote"], [1 / 3, 1 / 3, 1 / 3])
  np.testing.assert_allclose(out["confidence_weighted_vote"], [1 / 3, 1.0, 2 / 3])
  np.testing.assert_allclose(out["max_confidence_select"], [1 / 3, 1.0, 2 / 3])
  r1 = cal.compare_selectors(answers, confs, golds, ns=(2,), subsets=5, seed=3)
  r2 = cal.compare_selectors(answers, confs, golds, ns=(2,), subsets=5, seed=3)
  assert r1["majority_vote"] == r2["majority_vote"]
  full = cal.compare_selectors(answers, confs, golds, ns=(4,), subsets=3, seed=0)
  assert full["majority_vote"][0] == pytest.approx(1 / 3)       # every 4-subset is the full set
  with pytest.raises(ValueError, match="ns"):
    cal.compare_selectors(answers, confs, golds, ns=(5,))
  with pytest.raises(ValueError, match="methods"):
    cal.compare_selectors(answers, confs, golds, methods=("best",), ns=(1,))
  with pytest.raises(ValueError, match="golds_Q"):
    cal.compare_selectors(answers, confs, golds[:2], ns=(1,))
