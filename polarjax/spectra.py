"""IR and Raman spectra from MD time series via autocorrelation functions.

Conventions (all host numpy, float64)
-------------------------------------
Time step ``dt`` in fs, frequencies as wavenumbers ν̃ in cm⁻¹ (ω = 2π c ν̃).

Autocorrelation (:func:`autocorrelation`): for a series x(t_k) [T, ...] (components summed)

    C(τ_m) = 1/(T − m) Σ_k x(t_k) · x(t_k + τ_m),   m = 0 … L − 1   ("unbiased"),

computed with zero-padded FFTs. ``normalize="biased"`` divides by T instead.

Line shape (:func:`spectrum_from_acf`): C is multiplied by a one-sided window w (Hann:
w_m = cos²(π m / 2L), 1 at τ = 0 and 0 at the maximum lag; 'gaussian', 'none') and

    S(ω) = ∫_{−∞}^{∞} dt e^{−iωt} w(t) C(t) = dt [C_0 + 2 Σ_{m≥1} w_m C_m cos(ω m dt)]

(C even in t), evaluated on a grid zero-padded ``pad`` times for smoother curves (this
interpolates; resolution is set by the maximum lag, Δν̃ ≈ 1 / (c · L dt)). S has the
units of C times fs. Integral check: (1/2π) ∫ S(ω) dω = C_0 (Parseval).

IR absorption (:func:`ir_spectrum`), SI formula with the harmonic quantum correction:

    α(ω) n(ω) = (1 − e^{−βħω}) ω / (3 ħ c ε₀ V) · (1/2π) ∫ dt e^{−iωt} ⟨M(0)·M(t)⟩_quantum
    ⟨·⟩_quantum ≈ Q(ω) ⟨·⟩_classical,   Q_harmonic = βħω / (1 − e^{−βħω}),

and with ⟨Ṁ Ṁ⟩(ω) = ω² ⟨M M⟩(ω) this becomes, for the harmonic correction (default),

    α(ω) n(ω) = β / (6 c ε₀ V) · ∫ dt e^{−iωt} ⟨Ṁ(0)·Ṁ(t)⟩     (cm⁻¹),

where M is the cell dipole (e·Å), Ṁ = Σ_i Z*_i v_i its time derivative (e·Å/fs; or a
finite difference of M), V the volume (Å³), β = 1/k_B T. Other corrections multiply this
by Q(ω)(1 − e^{−x})/x with x = βħω: 'standard' Q = 2/(1 + e^{−x}), 'schofield'
Q = e^{x/2}, 'none' Q = 1 (classical line shape in the quantum formula). Without a volume
(open systems) the spectrum is α n · V in cm⁻¹·Å³ ("absorption cross-section" units).

Raman (:func:`raman_spectrum`) from the system polarizability α(t) (3×3, e·Å²/V):
isotropic part ᾱ = Tr α / 3, anisotropic part β = α − ᾱ I, and

    I_iso(ω)   = FT ⟨ᾱ̇(0) ᾱ̇(t)⟩,        I_aniso(ω) = FT (1/10) ⟨Tr β̇(0) β̇(t)⟩,
    I_VV = I_iso + (4/3) I_aniso,      I_VH = I_aniso,

the orientational averages I_∥ = a² + (4/45) γ², I_⊥ = (3/45) γ² with the anisotropy
γ² = (3/2) Tr β² (so I_VH / I_VV = 3/4 for a purely anisotropic scatterer). The time derivatives (central
differences) remove the elastic (Rayleigh) line at ω = 0; multiply by ω⁻² for the
polarizability-correlation form. The same quantum correction factor Q(ω) is applied
(default 'harmonic'); Raman intensities are in arbitrary units ((e·Å²/V)²/fs).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

#: ħ in eV·fs, k_B in eV/K, c in cm/fs.
HBAR = 0.6582119569
KB = 8.617333262e-5
C_CM_PER_FS = 2.99792458e-5

_E = 1.602176634e-19  # C
_EPS0 = 8.8541878128e-12  # F/m
_C_SI = 2.99792458e8  # m/s
_KB_SI = 1.380649e-23  # J/K

QUANTUM_CORRECTIONS = ("harmonic", "standard", "schofield", "none")
WINDOWS = ("hann", "gaussian", "none")


# ----------------------------------------------------------------------------- basics


def autocorrelation(x, max_lag: Optional[int] = None, normalize: str = "unbiased",
                    subtract_mean: bool = False) -> np.ndarray:
    """C(m) = ⟨x(0)·x(m)⟩ for m = 0 … max_lag − 1 (trailing axes are dotted).

    Args:
      x: [T] or [T, ...] time series.
      max_lag: number of lags L (default T // 2, at most T).
      normalize: 'unbiased' (1/(T − m)) or 'biased' (1/T).
      subtract_mean: remove the time average first.
    """
    x = np.asarray(x, np.float64)
    num = x.shape[0]
    if num < 2:
        raise ValueError("need at least two samples")
    x = x.reshape(num, -1)
    if subtract_mean:
        x = x - x.mean(axis=0)
    lags = num // 2 if max_lag is None else int(max_lag)
    if not 1 <= lags <= num:
        raise ValueError(f"max_lag must be in [1, {num}], got {lags}")
    size = 1 << int(math.ceil(math.log2(2 * num)))
    f = np.fft.rfft(x, n=size, axis=0)
    acf = np.fft.irfft(f * np.conj(f), n=size, axis=0)[:lags].sum(axis=1)
    if normalize == "unbiased":
        acf = acf / (num - np.arange(lags))
    elif normalize == "biased":
        acf = acf / num
    else:
        raise ValueError("normalize must be 'unbiased' or 'biased'")
    return acf


def lag_window(name: str, length: int) -> np.ndarray:
    """One-sided window w_m, m = 0 … length − 1 (w_0 = 1)."""
    m = np.arange(length, dtype=np.float64)
    if name == "hann":
        return np.cos(0.5 * np.pi * m / length) ** 2
    if name == "gaussian":
        return np.exp(-0.5 * (m / (length / 3.0)) ** 2)
    if name == "none":
        return np.ones(length)
    raise ValueError(f"window must be one of {WINDOWS}, got {name!r}")


def spectrum_from_acf(acf, dt: float, window: str = "hann", pad: int = 4):
    """(wavenumber [cm⁻¹], S) with S(ω) = ∫ dt e^{−iωt} w(t) C(t) (units of C × fs).

    Args:
      acf: C(m dt), m = 0 … L − 1 (one-sided, even in t).
      dt: sampling interval (fs). window: see :func:`lag_window`. pad: zero-padding factor.
    """
    acf = np.asarray(acf, np.float64)
    length = len(acf)
    weighted = acf * lag_window(window, length)
    size = max(2 * length, int(pad) * length)
    size = 1 << int(math.ceil(math.log2(size)))
    buffer = np.zeros(size)
    buffer[:length] = weighted
    spectrum = dt * (2.0 * np.real(np.fft.rfft(buffer)) - weighted[0])
    frequency = np.fft.rfftfreq(size, d=dt)  # 1/fs
    return frequency / C_CM_PER_FS, spectrum


def quantum_correction(wavenumber, temperature: float, kind: str = "harmonic") -> np.ndarray:
    """Q(ω) for x = βħω: harmonic x/(1 − e^{−x}), standard 2/(1 + e^{−x}), schofield e^{x/2}, none 1."""
    x = HBAR * 2.0 * np.pi * C_CM_PER_FS * np.asarray(wavenumber, np.float64) / (KB * temperature)
    if kind == "harmonic":
        return np.where(x > 1e-8, x / -np.expm1(-np.maximum(x, 1e-8)), 1.0 + 0.5 * x)
    if kind == "standard":
        return 2.0 / (1.0 + np.exp(-x))
    if kind == "schofield":
        return np.exp(0.5 * x)
    if kind == "none":
        return np.ones_like(x)
    raise ValueError(f"quantum correction must be one of {QUANTUM_CORRECTIONS}, got {kind!r}")


def _relative_to_harmonic(wavenumber, temperature, kind):
    """Q(ω)(1 − e^{−x})/x: the factor that turns the harmonic-corrected IR formula into ``kind``."""
    x = HBAR * 2.0 * np.pi * C_CM_PER_FS * np.asarray(wavenumber, np.float64) / (KB * temperature)
    xs = np.maximum(x, 1e-8)
    return quantum_correction(wavenumber, temperature, kind) * -np.expm1(-xs) / xs


def time_derivative(x, dt: float) -> np.ndarray:
    """Central finite difference along axis 0 (one-sided at the ends), per fs."""
    return np.gradient(np.asarray(x, np.float64), dt, axis=0)


def dipole_rate_from_zstar(zstar, velocities) -> np.ndarray:
    """Ṁ_α(t) = Σ_i Z*_{i,αβ} v_iβ from [T, n, 3, 3] Born charges and [T, n, 3] velocities."""
    return np.einsum("tiab,tib->ta", np.asarray(zstar), np.asarray(velocities))


# ----------------------------------------------------------------------------- IR / Raman


@dataclasses.dataclass
class Spectrum:
    """A spectrum on a wavenumber grid.

    wavenumber [K] cm⁻¹; intensity [K] (``units``); columns: extra named curves [K].
    """

    wavenumber: np.ndarray
    intensity: np.ndarray
    units: str
    columns: dict = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)

    def peaks(self, min_wavenumber: float = 1.0, prominence: float = 0.05, max_peaks: int = 10, curve=None):
        """Wavenumbers of the largest local maxima above ``prominence`` × max (descending height)."""
        y = self.intensity if curve is None else self.columns[curve]
        return find_peaks(self.wavenumber, y, min_wavenumber, prominence, max_peaks)

    def write_csv(self, path):
        path = Path(path)
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            for key, value in self.meta.items():
                handle.write(f"# {key}: {value}\n")
            names = ["wavenumber_cm-1", f"intensity_{self.units}"] + list(self.columns)
            writer.writerow(names)
            for row in zip(self.wavenumber, self.intensity, *self.columns.values()):
                writer.writerow([f"{v:.8g}" for v in row])
        return path

    def plot(self, path, xlim=(0.0, 4500.0), title: Optional[str] = None, curves: Optional[Sequence[str]] = None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(self.wavenumber, self.intensity, lw=1.2, label=self.meta.get("label", "spectrum"))
        for name in curves or ():
            ax.plot(self.wavenumber, self.columns[name], lw=1.0, label=name)
        ax.set_xlim(*xlim)
        ax.set_xlabel("wavenumber (cm$^{-1}$)")
        ax.set_ylabel(self.units)
        if title:
            ax.set_title(title)
        if curves:
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def find_peaks(x, y, min_x: float = 1.0, prominence: float = 0.05, max_peaks: int = 10) -> np.ndarray:
    """x of local maxima of y (x > min_x, y > prominence · max y), highest first."""
    x, y = np.asarray(x), np.asarray(y)
    keep = x > min_x
    top = np.max(y[keep]) if np.any(keep) else 0.0
    interior = (y[1:-1] > y[:-2]) & (y[1:-1] >= y[2:]) & keep[1:-1] & (y[1:-1] > prominence * top)
    index = np.flatnonzero(interior) + 1
    index = index[np.argsort(-y[index])][:max_peaks]
    # parabolic refinement of the maximum
    out = []
    for i in index:
        y0, y1, y2 = y[i - 1], y[i], y[i + 1]
        denom = y0 - 2 * y1 + y2
        shift = 0.5 * (y0 - y2) / denom if denom != 0 else 0.0
        out.append(x[i] + shift * (x[1] - x[0]))
    return np.asarray(out)


def _max_lag(num: int, dt: float, max_lag_fs: Optional[float]) -> int:
    if max_lag_fs is None:
        return max(2, num // 2)
    return int(min(num, max(2, round(max_lag_fs / dt) + 1)))


def ir_spectrum(dipole_rate, dt: float, temperature: float, volume: Optional[float] = None,
                max_lag_fs: Optional[float] = None, window: str = "hann", quantum: str = "harmonic",
                pad: int = 4, subtract_mean: bool = True) -> Spectrum:
    """IR absorption α(ω) n(ω) from Ṁ(t) (see the module docstring).

    Args:
      dipole_rate: [T, 3] Ṁ in e·Å/fs (e.g. the ``dipole_rate`` frames, or
        :func:`time_derivative` of the cell dipole, or :func:`dipole_rate_from_zstar`).
      dt: sampling interval (fs). temperature: K. volume: Å³ (None: report α n V).
      max_lag_fs: correlation length (default half the series).
      window, quantum, pad: see :func:`spectrum_from_acf` and :func:`quantum_correction`.
      subtract_mean: remove ⟨Ṁ⟩ (a drift of M, e.g. a net current, would give a ω = 0 line).

    Returns:
      Spectrum with intensity in cm⁻¹ (or cm⁻¹·Å³), columns 'lineshape' (the windowed
      FT of ⟨Ṁ·Ṁ⟩, (e·Å/fs)²·fs).
    """
    rate = np.asarray(dipole_rate, np.float64)
    lags = _max_lag(len(rate), dt, max_lag_fs)
    acf = autocorrelation(rate, lags, subtract_mean=subtract_mean)
    wavenumber, lineshape = spectrum_from_acf(acf, dt, window, pad)
    # β / (6 c ε0 V) ∫ ⟨ṀṀ⟩ e^{-iωt} dt in SI, then m⁻¹ → cm⁻¹
    integral_si = lineshape * (_E * 1e-10 / 1e-15) ** 2 * 1e-15
    vol = 1.0 if volume is None else float(volume)
    alpha_n = integral_si / (6.0 * _C_SI * _EPS0 * vol * 1e-30 * _KB_SI * temperature) * 1e-2
    alpha_n = alpha_n * _relative_to_harmonic(wavenumber, temperature, quantum)
    units = "cm^-1" if volume is not None else "cm^-1*A^3"
    meta = dict(kind="IR absorption alpha*n", temperature_K=temperature, volume_A3=volume, dt_fs=dt,
                max_lag_fs=(lags - 1) * dt, window=window, quantum_correction=quantum, samples=len(rate),
                label="IR alpha(w) n(w)")
    return Spectrum(wavenumber, alpha_n, units, {"lineshape": lineshape}, meta)


def raman_spectrum(polarizability, dt: float, temperature: float, max_lag_fs: Optional[float] = None,
                   window: str = "hann", quantum: str = "harmonic", pad: int = 4, derivative: bool = True) -> Spectrum:
    """Isotropic / anisotropic Raman spectra from α(t) [T, 3, 3] (see the module docstring).

    Returns:
      Spectrum with intensity = I_VV (unpolarized-detection VV) and columns 'isotropic',
      'anisotropic', 'VV', 'VH' (arbitrary units).
    """
    alpha = np.asarray(polarizability, np.float64).reshape(-1, 3, 3)
    alpha = 0.5 * (alpha + np.swapaxes(alpha, 1, 2))
    iso = np.trace(alpha, axis1=1, axis2=2) / 3.0
    aniso = alpha - iso[:, None, None] * np.eye(3)
    if derivative:
        iso, aniso = time_derivative(iso, dt), time_derivative(aniso, dt)
    lags = _max_lag(len(alpha), dt, max_lag_fs)
    acf_iso = autocorrelation(iso, lags, subtract_mean=not derivative)
    acf_aniso = 0.1 * autocorrelation(aniso.reshape(len(aniso), 9), lags, subtract_mean=not derivative)
    wavenumber, s_iso = spectrum_from_acf(acf_iso, dt, window, pad)
    _, s_aniso = spectrum_from_acf(acf_aniso, dt, window, pad)
    q = quantum_correction(wavenumber, temperature, quantum)
    s_iso, s_aniso = s_iso * q, s_aniso * q
    vv = s_iso + (4.0 / 3.0) * s_aniso
    vh = s_aniso
    meta = dict(kind="Raman", temperature_K=temperature, dt_fs=dt, max_lag_fs=(lags - 1) * dt, window=window,
                quantum_correction=quantum, derivative=derivative, samples=len(alpha), label="Raman VV")
    return Spectrum(wavenumber, vv, "arb", {"isotropic": s_iso, "anisotropic": s_aniso, "VV": vv, "VH": vh}, meta)


def ir_from_trajectory(traj: dict, temperature: Optional[float] = None, **kwargs) -> Spectrum:
    """IR spectrum from :func:`polarjax.md.read_trajectory` output.

    Uses, in order: ``dipole_rate`` (Ṁ recorded in MD), ``zstar`` with ``velocities``,
    or the finite difference of ``total_dipole`` (unreliable for periodic systems where M
    jumps when atoms are wrapped into the cell; a warning is raised then).
    """
    dt = _frame_interval(traj)
    if "dipole_rate" in traj:
        rate = traj["dipole_rate"]
    elif "zstar" in traj and "velocities" in traj:
        rate = dipole_rate_from_zstar(traj["zstar"].reshape(len(traj["zstar"]), -1, 3, 3), traj["velocities"])
    elif "total_dipole" in traj:
        if traj.get("periodic", False):
            import warnings

            warnings.warn("IR from finite differences of the cell dipole of a periodic trajectory: wrapped atoms "
                          "make M jump; record 'dipole_rate' instead")
        rate = time_derivative(traj["total_dipole"], dt)
    else:
        raise ValueError("the trajectory has none of dipole_rate, zstar (+ velocities) or total_dipole; "
                         "run MD with --outputs dipole_rate")
    temperature = _temperature(traj, temperature)
    volume = float(np.mean(np.abs(np.linalg.det(traj["cell"])))) if traj.get("periodic", False) else None
    return ir_spectrum(rate, dt, temperature, volume, **kwargs)


def raman_from_trajectory(traj: dict, temperature: Optional[float] = None, **kwargs) -> Spectrum:
    """Raman spectra from the ``polarizability`` frames of a trajectory."""
    if "polarizability" not in traj:
        raise ValueError("the trajectory has no polarizability; run MD with --outputs polarizability")
    return raman_spectrum(traj["polarizability"], _frame_interval(traj), _temperature(traj, temperature), **kwargs)


def _frame_interval(traj: dict) -> float:
    times = np.asarray(traj.get("time", []), np.float64)
    if len(times) < 2:
        raise ValueError("the trajectory needs at least two frames with a 'time' (fs)")
    steps = np.diff(times)
    if np.ptp(steps) > 1e-6 * max(1.0, abs(steps[0])):
        raise ValueError("frames are not equally spaced in time (a restart with a different stride?)")
    return float(steps[0])


def _temperature(traj: dict, temperature: Optional[float]) -> float:
    if temperature is not None:
        return float(temperature)
    if "target_temperature" in traj and np.all(np.asarray(traj["target_temperature"]) > 0):
        return float(np.asarray(traj["target_temperature"])[0])
    if "temperature" in traj:
        return float(np.mean(traj["temperature"]))
    raise ValueError("no temperature given or recorded")
