"""Spectra from correlation functions: analytic signals, normalisation, Raman invariants,
and the IR of a harmonic toy molecule run through the MD engine (float64)."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest

from polarjax import md, spectra

C = spectra.C_CM_PER_FS


def _omega(wavenumber):
    return 2.0 * np.pi * C * wavenumber  # rad/fs


def test_autocorrelation_matches_direct_sum():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    acf = spectra.autocorrelation(x, max_lag=50)
    direct = [np.sum(x[: 300 - m] * x[m:]) / (300 - m) for m in range(50)]
    np.testing.assert_allclose(acf, direct, rtol=1e-12, atol=1e-12)
    biased = spectra.autocorrelation(x, max_lag=50, normalize="biased")
    np.testing.assert_allclose(biased, np.asarray(direct) * (300 - np.arange(50)) / 300, rtol=1e-12)


def test_damped_cosine_acf_peaks_at_the_right_frequencies():
    dt = 0.5
    t = np.arange(8000) * dt
    lines = (700.0, 1640.0, 3400.0)
    acf = sum(a * np.cos(_omega(w) * t) for a, w in zip((1.0, 0.5, 2.0), lines)) * np.exp(-t / 400.0)
    wavenumber, s = spectra.spectrum_from_acf(acf, dt, window="hann", pad=4)
    peaks = spectra.find_peaks(wavenumber, s, min_x=100.0, prominence=0.05)
    assert len(peaks) == 3
    np.testing.assert_allclose(np.sort(peaks), lines, atol=2.0)
    assert abs(peaks[0] - 3400.0) < 2.0  # the strongest line first


def test_random_phase_cosines_from_a_signal():
    rng = np.random.default_rng(1)
    dt = 1.0
    t = np.arange(20000) * dt
    lines = (1000.0, 2500.0)
    x = np.stack([sum(np.cos(_omega(w) * t + rng.uniform(0, 2 * np.pi)) for w in lines) for _ in range(3)], -1)
    x += 0.05 * rng.normal(size=x.shape)
    wavenumber, s = spectra.spectrum_from_acf(spectra.autocorrelation(x, max_lag=2000), dt)
    peaks = spectra.find_peaks(wavenumber, s, min_x=100.0, prominence=0.2)
    np.testing.assert_allclose(np.sort(peaks), lines, atol=3.0)


def test_parseval_normalisation():
    """(1/2π) ∫ S(ω) dω = C(0) for any window (w_0 = 1)."""
    dt = 0.5
    t = np.arange(4000) * dt
    acf = 3.0 * np.cos(_omega(1500.0) * t) * np.exp(-t / 200.0)
    for window in spectra.WINDOWS:
        wavenumber, s = spectra.spectrum_from_acf(acf, dt, window=window)
        domega = _omega(wavenumber[1] - wavenumber[0])
        # S is even in ω: the one-sided sum counts ω = 0 once
        integral = (2.0 * np.sum(s) - s[0]) * domega / (2.0 * np.pi)
        assert integral == pytest.approx(acf[0], rel=1e-6)


def test_ir_prefactor_and_quantum_corrections():
    """∫ α n dω equals β/(6 c ε0 V) · 2π ⟨Ṁ²⟩ (harmonic correction), in SI units."""
    rng = np.random.default_rng(2)
    dt, temperature, volume = 0.5, 300.0, 1000.0
    t = np.arange(16000) * dt
    rate = np.stack([0.01 * np.cos(_omega(1700.0) * t + rng.uniform(0, 6.3)) for _ in range(3)], -1)
    spec = spectra.ir_spectrum(rate, dt, temperature, volume, max_lag_fs=2000.0, subtract_mean=False)
    assert spec.units == "cm^-1"
    domega = _omega(spec.wavenumber[1] - spec.wavenumber[0]) * 1e15  # rad/s
    integral = (2.0 * np.sum(spec.intensity) - spec.intensity[0]) * domega / 2.0  # ∫_{-∞}^{∞} / 2 → one side ×2
    c0 = spectra.autocorrelation(rate, 2)[0] * (1.602176634e-19 * 1e-10 / 1e-15) ** 2
    beta = 1.0 / (1.380649e-23 * temperature)
    expected = beta / (6 * 2.99792458e8 * 8.8541878128e-12 * volume * 1e-30) * 2 * np.pi * c0 / 2 * 1e-2
    assert integral == pytest.approx(expected, rel=2e-3)
    assert spec.peaks(min_wavenumber=100)[0] == pytest.approx(1700.0, abs=3.0)
    # corrections: all → 1 at ω → 0; ordering at high frequency
    w = np.array([1e-6, 3000.0])
    for kind in spectra.QUANTUM_CORRECTIONS:
        assert spectra.quantum_correction(w, 300.0, kind)[0] == pytest.approx(1.0, abs=1e-6)
    x = spectra.HBAR * _omega(3000.0) / (spectra.KB * 300.0)
    assert spectra.quantum_correction(3000.0, 300.0, "harmonic") == pytest.approx(x / (1 - np.exp(-x)))
    classical = spectra.ir_spectrum(rate, dt, temperature, volume, max_lag_fs=2000.0, quantum="none",
                                    subtract_mean=False)
    xs = spectra.HBAR * _omega(spec.wavenumber[1:]) / (spectra.KB * temperature)
    np.testing.assert_allclose(classical.intensity[1:], spec.intensity[1:] * (1 - np.exp(-xs)) / xs, rtol=1e-10)


def test_raman_isotropic_and_anisotropic_parts():
    rng = np.random.default_rng(3)
    dt = 1.0
    t = np.arange(8000) * dt
    iso = 0.1 * np.cos(_omega(1000.0) * t)
    a = rng.normal(size=(3, 3))
    a = a + a.T
    a -= np.trace(a) / 3 * np.eye(3)
    aniso = np.cos(_omega(2000.0) * t)[:, None, None] * a[None] * 0.05
    alpha = iso[:, None, None] * np.eye(3) + aniso + 1.5 * np.eye(3)  # + static part
    spec = spectra.raman_spectrum(alpha, dt, 300.0, max_lag_fs=2000.0)
    assert spec.peaks(min_wavenumber=100, curve="isotropic")[0] == pytest.approx(1000.0, abs=3.0)
    assert spec.peaks(min_wavenumber=100, curve="anisotropic")[0] == pytest.approx(2000.0, abs=3.0)
    # a traceless modulation scatters only in the anisotropic channel, with VH/VV = 3/4
    only_aniso = spectra.raman_spectrum(aniso + 1.5 * np.eye(3), dt, 300.0, max_lag_fs=2000.0)
    i = np.argmax(only_aniso.columns["VV"])
    assert only_aniso.columns["VH"][i] / only_aniso.columns["VV"][i] == pytest.approx(0.75, rel=1e-9)
    assert np.max(np.abs(only_aniso.columns["isotropic"])) < 1e-12 * np.max(only_aniso.columns["VV"])


class HarmonicDiatomic(md.Potential):
    """E = ½ k (|r1 − r2| − r0)², fixed charges ±q (Z* = ±q I)."""

    def __init__(self, k, r0, q):
        self.k, self.r0, self.q = k, r0, q
        self.num_atoms = 2
        self.periodic = False
        self.dtype = jnp.float64

    def forward(self, R, box=None, neighbor=None, perturbation=None, field=None):
        r = self.cartesian(R, box, perturbation)
        d = jnp.linalg.norm(r[0] - r[1])
        charges = jnp.asarray([self.q, -self.q], R.dtype)
        return dict(energy=0.5 * self.k * (d - self.r0) ** 2, total_dipole=charges @ r, total_charges=charges,
                    total_dipoles=jnp.zeros((2, 3), R.dtype))


def test_harmonic_toy_ir_peak_at_the_vibrational_frequency(tmp_path):
    masses = np.array([12.0, 16.0])
    mu = masses.prod() / masses.sum()
    target = 1200.0  # cm⁻¹
    k = _omega(target) ** 2 * mu * md.AMU  # eV/Å²
    pot = HarmonicDiatomic(k, 1.2, 0.4)
    system = md.MDSystem([[0.0, 0.0, 0.0], [1.3, 0.1, -0.05]], [6, 8], np.zeros((3, 3)), False, masses)
    config = md.MDConfig(ensemble="nve", timestep=0.5, temperature=0.0, stride=2, frames_per_call=500,
                         outputs=("dipole_rate", "total_dipole"), initial_velocities="zero")
    sim = md.Simulation(pot, system, config)
    path = tmp_path / "toy.xyz"
    sim.run(4000, writer=md.TrajectoryWriter(path, info=dict(target_temperature=300.0)))
    traj = md.read_trajectory(path)
    # Ṁ from the forward-mode JVP equals q (v1 − v2) and the finite difference of M
    np.testing.assert_allclose(traj["dipole_rate"], 0.4 * (traj["velocities"][:, 0] - traj["velocities"][:, 1]),
                               atol=1e-9)
    fd = spectra.time_derivative(traj["total_dipole"], 1.0)
    # central differences at 1 fs under-estimate a 1200 cm⁻¹ oscillation by (ωΔt)²/6 ≈ 0.9 %
    np.testing.assert_allclose(fd[1:-1], traj["dipole_rate"][1:-1], atol=1.5e-2 * np.abs(traj["dipole_rate"]).max())
    spec = spectra.ir_from_trajectory(traj)
    assert spec.meta["temperature_K"] == 300.0
    peak = spec.peaks(min_wavenumber=200.0)[0]
    assert peak == pytest.approx(target, rel=5e-3)
    spec.write_csv(tmp_path / "ir.csv")
    spec.plot(tmp_path / "ir.png")
    assert (tmp_path / "ir.png").stat().st_size > 1000
