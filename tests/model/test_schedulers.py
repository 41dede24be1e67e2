"""The samplers behind --scheduler reproduce independent references on a fixed model and noise.

- ddim: cxrgen's batched guided sampler equals docs/algorithm.md's single-image loop over MONAI's own
  DDIMScheduler.
- dpmpp2m: cxrgen's DPM-Solver++(2M) equals (a) the multistep data-prediction update of Lu et al.
  2022 (arXiv:2211.01095, Algorithm 2) written out below from the paper in float64, with its own
  noise schedule, and (b) diffusers' DPMSolverMultistepScheduler (a test-only dependency) on the
  same timesteps.
"""
import math

import pytest
import torch

from cxrgen.model import demo
from cxrgen.model.sampling import initial_latents, sample_cfg
from cxrgen.model.schedulers import make_scheduler

SCHEDULER = demo.SCHEDULER  # the bundle's DDIM settings (v-prediction, scaled linear betas)
SEEDS = [11, 12, 13]
GUIDANCE = [7.0, 3.0, 1.0]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    """A fixed tiny UNet with random weights, fixed text embeddings and fixed noise."""
    _, unet = demo.build_networks(seed=3)
    gen = torch.Generator().manual_seed(5)
    cond = torch.randn(len(SEEDS), 77, demo.WIDTH, generator=gen)
    uncond = torch.randn(1, 77, demo.WIDTH, generator=gen).expand(len(SEEDS), -1, -1)
    return unet, cond, uncond, contract_noise(SEEDS)


def contract_noise(seeds) -> torch.Tensor:
    """The noise contract of docs/algorithm.md, written out here and not taken from cxrgen (so it can catch a contract bug)."""
    return torch.cat([torch.randn((1, *demo.LATENT), generator=torch.Generator("cpu").manual_seed(s),
                                  dtype=torch.float32) for s in seeds])


def test_initial_latents_follow_the_noise_contract():
    seeds = [0, 11, 2**63 - 1, 12]
    noise = initial_latents(seeds, demo.LATENT)
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert noise.shape == (len(seeds), *demo.LATENT)
    assert torch.equal(noise, contract_noise(seeds))


def test_noise_of_an_image_does_not_depend_on_its_batch():
    alone = initial_latents([12], demo.LATENT)
    for batch in ([12, 11], [11, 12, 13], [13, 13, 12], [12] * 3):
        noise = initial_latents(batch, demo.LATENT)
        for i, seed in enumerate(batch):
            if seed == 12:
                assert torch.equal(noise[i:i + 1], alone), batch
    assert not torch.equal(initial_latents([11], demo.LATENT), alone)


def _denoise(unet):
    def denoise(x, timesteps, context):
        return unet(x, timesteps=timesteps, context=context).float()
    return denoise


def _guided(unet, x, t, cond, uncond, g):
    """The guided model output of one image (batch 1, unconditional row first) at timestep t."""
    out = unet(torch.cat([x, x]), timesteps=torch.tensor([int(t)]), context=torch.cat([uncond, cond]))
    u, c = out.chunk(2)
    return u + g * (c - u)


# ------------------------------------------------------------------------------------------ DDIM

@torch.no_grad()
@pytest.mark.parametrize("steps", [1, 4, 10])
def test_ddim_through_cxrgen_equals_monai_ddim_single_image_loop(model, steps):
    from monai.networks.schedulers import DDIMScheduler

    unet, cond, uncond, noise = model
    scheduler = make_scheduler("ddim", SCHEDULER, steps)
    assert isinstance(scheduler, DDIMScheduler)
    ours = sample_cfg(_denoise(unet), noise, cond, uncond, torch.tensor(GUIDANCE), scheduler)

    for i in range(len(SEEDS)):
        reference = DDIMScheduler(**SCHEDULER)
        reference.set_timesteps(num_inference_steps=steps)
        x = noise[i:i + 1].clone()
        for t in reference.timesteps:
            x, _ = reference.step(_guided(unet, x, t, cond[i:i + 1], uncond[i:i + 1], GUIDANCE[i]), t, x)
        torch.testing.assert_close(ours[i:i + 1], x, rtol=1e-5, atol=1e-5)


def test_ddim_timesteps_are_monais(model):
    from monai.networks.schedulers import DDIMScheduler

    reference = DDIMScheduler(**SCHEDULER)
    reference.set_timesteps(num_inference_steps=50)
    assert torch.equal(make_scheduler("ddim", SCHEDULER, 50).timesteps, reference.timesteps)


# ------------------------------------------------------------------------- DPM-Solver++(2M), paper

def _paper_schedule():
    """alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of the discrete scaled-linear schedule, float64."""
    n = SCHEDULER["num_train_timesteps"]
    root_betas = torch.linspace(math.sqrt(SCHEDULER["beta_start"]), math.sqrt(SCHEDULER["beta_end"]), n,
                                dtype=torch.float64)
    alpha_bar = torch.cumprod(1.0 - root_betas ** 2, dim=0)
    alpha, sigma = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


def _grid(steps: int) -> list[int]:
    """The time points: those of the bundle's DDIM schedule (MONAI's DDIMScheduler), noisiest first."""
    from monai.networks.schedulers import DDIMScheduler

    ddim = DDIMScheduler(**SCHEDULER)
    ddim.set_timesteps(num_inference_steps=steps)
    return [int(t) for t in ddim.timesteps]


@torch.no_grad()
def _paper_dpmpp_2m(unet, noise, cond, uncond, g, steps):
    """Algorithm 2 of the paper for one image, in float64 arithmetic.

    Points t_0 > t_1 > ... > t_{M-1} on the DDIM grid, then t_M = the clean end (sigma = 0). With
    x_theta the data prediction (alpha x - sigma v for a v-model) and h_i = lambda_{t_i} - lambda_{t_{i-1}}:
      i = 1:   x_{t_1} = (sigma_{t_1}/sigma_{t_0}) x_{t_0} - alpha_{t_1} (e^{-h_1} - 1) x_theta(t_0)
      i >= 2:  r_i = h_{i-1} / h_i,  D_i = (1 + 1/(2 r_i)) x_theta(t_{i-1}) - 1/(2 r_i) x_theta(t_{i-2}),
               x_{t_i} = (sigma_{t_i}/sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
    The last step, onto sigma = 0 (lambda = +inf), is taken first-order: with e^{-h} = 0 and alpha = 1
    it returns x_theta(t_{M-1}) (the lower-order final step recommended for few steps).
    """
    alpha, sigma, lam = _paper_schedule()
    grid = _grid(steps)
    x = noise.double()
    history = []  # (lambda, x_theta) of earlier points
    for i, t in enumerate(grid):
        v = _guided(unet, x.float(), t, cond, uncond, g).double()
        x0 = alpha[t] * x - sigma[t] * v
        if i == len(grid) - 1:
            x = x0
            break
        s = grid[i + 1]
        h = (lam[s] - lam[t]).item()
        if not history:
            d = x0
        else:
            r = (lam[t].item() - history[-1][0]) / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * history[-1][1]
        x = (sigma[s] / sigma[t]) * x - alpha[s] * math.expm1(-h) * d
        history.append((lam[t].item(), x0))
    return x.float()


@torch.no_grad()
@pytest.mark.parametrize("steps", [1, 2, 5, 16])
def test_dpmpp2m_reproduces_the_papers_multistep_update(model, steps):
    unet, cond, uncond, noise = model
    scheduler = make_scheduler("dpmpp2m", SCHEDULER, steps)
    assert [int(t) for t in scheduler.timesteps] == _grid(steps)
    ours = sample_cfg(_denoise(unet), noise, cond, uncond, torch.tensor(GUIDANCE), scheduler)
    for i in range(len(SEEDS)):
        expected = _paper_dpmpp_2m(unet, noise[i:i + 1], cond[i:i + 1], uncond[i:i + 1], GUIDANCE[i], steps)
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_dpmpp2m_restarts_cleanly_when_the_scheduler_is_reused(model):
    """A second sampling run on the same object must not use the first run's history."""
    unet, cond, uncond, noise = model
    scheduler = make_scheduler("dpmpp2m", SCHEDULER, 5)
    first = sample_cfg(_denoise(unet), noise, cond, uncond, torch.tensor(GUIDANCE), scheduler)
    second = sample_cfg(_denoise(unet), noise, cond, uncond, torch.tensor(GUIDANCE), scheduler)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_dpmpp2m_differs_from_ddim_but_both_are_finite(model):
    """Guards against the solver silently falling back to DDIM."""
    unet, cond, uncond, noise = model
    with torch.no_grad():
        a = sample_cfg(_denoise(unet), noise, cond, uncond, torch.tensor(GUIDANCE), make_scheduler("ddim", SCHEDULER, 5))
        b = sample_cfg(_denoise(unet), noise, cond, uncond, torch.tensor(GUIDANCE),
                       make_scheduler("dpmpp2m", SCHEDULER, 5))
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().max() > 1e-3


# ---------------------------------------------------------------------- DPM-Solver++(2M), diffusers

@torch.no_grad()
@pytest.mark.parametrize("steps", [3, 16])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers vs numpy 2, not ours
def test_dpmpp2m_matches_diffusers_multistep_scheduler(model, steps):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test extra: pip install -e '.[test]'")
    unet, cond, uncond, noise = model
    ours = sample_cfg(_denoise(unet), noise, cond, uncond, torch.tensor(GUIDANCE),
                      make_scheduler("dpmpp2m", SCHEDULER, steps))
    for i in range(len(SEEDS)):
        theirs = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=SCHEDULER["num_train_timesteps"], beta_start=SCHEDULER["beta_start"],
            beta_end=SCHEDULER["beta_end"], beta_schedule="scaled_linear", prediction_type="v_prediction",
            algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero",
            lower_order_final=True, thresholding=False)
        theirs.set_timesteps(timesteps=_grid(steps))
        x = noise[i:i + 1].clone()
        for t in theirs.timesteps:
            x = theirs.step(_guided(unet, x, t, cond[i:i + 1], uncond[i:i + 1], GUIDANCE[i]), t, x).prev_sample
        torch.testing.assert_close(ours[i:i + 1], x, rtol=1e-4, atol=1e-4)
