"""Reading labelled structures: extended XYZ parsing with configurable keys, every bad-input
error of polarjax.training.dataset (naming the file and the frame), explicit skipping with a
report, per-element reference energies (E0) and seeded splits.

Fast: no model, no JAX compilation.
"""

import hashlib

import ase
import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from polarjax.training.dataset import (DataError, ReadReport, check_species, fit_atomic_energies, read_frames,
                                       species_of, split_indices)

HEADER = 'Properties=species:S:1:pos:R:3:forces:R:3 energy={energy} pbc="F F F"'


def xyz_frame(symbols, positions, forces=None, header=HEADER, **fields):
    """Hand-written extended XYZ text of one frame."""
    forces = np.zeros((len(symbols), 3)) if forces is None else forces
    lines = [str(len(symbols)), header.format(energy=fields.pop("energy", "-1.5"), **fields)]
    for s, r, f in zip(symbols, positions, forces):
        lines.append(f"{s} {' '.join(str(x) for x in r)} {' '.join(str(x) for x in f)}")
    return "\n".join(lines) + "\n"


GOOD = xyz_frame(["Na", "Cl"], [[0, 0, 0], [2.5, 0, 0]], [[0.1, 0, 0], [-0.1, 0, 0]])


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_names_file_and_frame(error, path, index):
    message = str(error)
    assert str(path) in message, message
    assert f"frame {index}" in message, message


# ----------------------------------------------------------------------------- parsing


def test_reads_ase_written_labels(tmp_path):
    """Energy, forces, stress (Voigt), dipole and charges written by ASE come back intact."""
    rng = np.random.default_rng(0)
    images = []
    for k in range(3):
        atoms = ase.Atoms("NaClNa", positions=[[0, 0, 0], [2.4, 0.1, 0], [0.2, 2.6, 0.3 * k]], cell=np.diag([6.0, 7.0, 8.0]),
                          pbc=True)
        stress = rng.normal(size=6)
        atoms.calc = SinglePointCalculator(atoms, energy=-3.0 - k, forces=rng.normal(size=(3, 3)), stress=stress)
        atoms.info["dipole"] = rng.normal(size=3)
        atoms.arrays["charges"] = rng.normal(size=3)
        images.append(atoms)
    path = tmp_path / "labelled.xyz"
    ase.io.write(path, images, format="extxyz")

    frames, report = read_frames(path, keys=dict(charges="charges"))
    assert isinstance(report, ReadReport)
    assert report.num_frames == 3 and report.skipped == []
    assert report.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    for k, (frame, atoms) in enumerate(zip(frames, images)):
        assert frame.source == f"{path}:frame {k}"
        assert frame.periodic and frame.num_atoms == 3
        np.testing.assert_allclose(frame.positions, atoms.positions, atol=1e-7)
        np.testing.assert_array_equal(frame.numbers, [11, 17, 11])
        np.testing.assert_allclose(frame.cell, np.diag([6.0, 7.0, 8.0]))
        assert frame.labels["energy"] == pytest.approx(-3.0 - k)
        np.testing.assert_allclose(frame.labels["forces"], atoms.calc.results["forces"], atol=1e-7)
        xx, yy, zz, yz, xz, xy = atoms.calc.results["stress"]
        np.testing.assert_allclose(frame.labels["stress"], [[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]], atol=1e-7)
        np.testing.assert_allclose(frame.labels["dipole"], atoms.info["dipole"], atol=1e-7)
        np.testing.assert_allclose(frame.labels["charges"], atoms.arrays["charges"], atol=1e-7)


def test_configurable_keys(tmp_path):
    """Non-default key names (info and per-atom arrays) are mapped onto the standard labels;
    a label can be switched off with None."""
    header = 'Properties=species:S:1:pos:R:3:REF_forces:R:3 REF_energy={energy} REF_dipole="1 2 3" dipole="9 9 9" pbc="F F F"'
    text = xyz_frame(["Na", "Cl"], [[0, 0, 0], [2.5, 0, 0]], [[0.5, 0, 0], [-0.5, 0, 0]], header=header, energy="-7.25")
    path = write(tmp_path, "custom.xyz", text)

    frames, _ = read_frames(path, keys=dict(energy="REF_energy", forces="REF_forces", dipole="REF_dipole"))
    labels = frames[0].labels
    assert float(labels["energy"]) == -7.25
    np.testing.assert_allclose(labels["forces"], [[0.5, 0, 0], [-0.5, 0, 0]])
    np.testing.assert_allclose(labels["dipole"], [1, 2, 3])  # not the default-keyed "dipole" field

    frames, _ = read_frames(path, keys=dict(energy="REF_energy", forces="REF_forces", dipole=None))
    assert "dipole" not in frames[0].labels


def test_virial_becomes_stress(tmp_path):
    """A virial (eV) on a periodic frame gives stress = −virial / V."""
    virial = np.array([[1.0, 2, 3], [2, 5, 6], [3, 6, 9]])
    header = ('Lattice="5 0 0 0 4 0 0 0 2" Properties=species:S:1:pos:R:3:forces:R:3 energy={energy} '
              f'virial="{" ".join(str(v) for v in virial.ravel())}" pbc="T T T"')
    path = write(tmp_path, "virial.xyz", xyz_frame(["Na", "Cl"], [[0, 0, 0], [2.5, 0, 0]], header=header))
    frames, _ = read_frames(path)
    np.testing.assert_allclose(frames[0].labels["stress"], -virial / 40.0)


def test_optional_requirements(tmp_path):
    """Unlabelled structures are readable when nothing is required (evaluation of new data)."""
    path = tmp_path / "bare.xyz"
    ase.io.write(path, [ase.Atoms("NaCl", positions=[[0, 0, 0], [2.4, 0, 0]])], format="extxyz")
    with pytest.raises(DataError, match="required label 'energy'"):
        read_frames(path)
    frames, _ = read_frames(path, require=())
    assert frames[0].labels == {}


# ----------------------------------------------------------------------------- bad input

SECOND_FRAME_PROBLEMS = {
    # name: (text of frame 1, read_frames kwargs, regex the message must match)
    "missing_energy": (xyz_frame(["Na", "Cl"], [[0, 0, 0], [2.5, 0, 0]],
                                 header='Properties=species:S:1:pos:R:3:forces:R:3 free_energy={energy} pbc="F F F"'),
                       {}, r"required label 'energy' \(key 'energy'\) not found; available keys: .*free_energy"),
    "misnamed_forces_key": (GOOD, dict(keys=dict(forces="force")),
                            r"required label 'forces' \(key 'force'\) not found; available keys: .*'forces'"),
    "forces_wrong_columns": (xyz_frame(["Na", "Cl"], [[0, 0, 0], [2.5, 0, 0]], [[1, 2], [3, 4]],
                                       header='Properties=species:S:1:pos:R:3:forces:R:2 energy={energy} pbc="F F F"'),
                             {}, r"'forces' has shape \(2, 2\), expected \(2, 3\)"),
    "dipole_wrong_length": (xyz_frame(["Na", "Cl"], [[0, 0, 0], [2.5, 0, 0]],
                                      header=HEADER + ' dipole="1 2"'), {}, r"'dipole' has shape \(2,\), expected \(3,\)"),
    "energy_nan": (xyz_frame(["Na", "Cl"], [[0, 0, 0], [2.5, 0, 0]], energy="nan"), {}, r"'energy' contains NaN or inf"),
    "forces_inf": (xyz_frame(["Na", "Cl"], [[0, 0, 0], [2.5, 0, 0]], [[0, 0, "inf"], [0, 0, 0]]), {},
                   r"'forces' contains NaN or inf"),
    "energy_not_numeric": (xyz_frame(["Na", "Cl"], [[0, 0, 0], [2.5, 0, 0]], energy="abc"), {}, r"'energy' is not numeric"),
    "no_atoms": ('0\nenergy=1.0 pbc="F F F"\n', {}, r"frame has no atoms"),
    "overlapping_atoms": (xyz_frame(["Na", "Cl", "Na"], [[0, 0, 0], [2.5, 0, 0], [0.02, 0.03, 0]]), {},
                          r"atoms 0 and 2 overlap \(distance 0.036"),
    "overlap_through_periodic_boundary": (
        xyz_frame(["Na", "Cl"], [[0.01, 1, 1], [4.98, 1, 1]],
                  header='Lattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3:forces:R:3 energy={energy} pbc="T T T"'),
        {}, r"atoms 0 and 1 overlap \(distance 0.03"),
    "singular_cell": (xyz_frame(["Na", "Cl"], [[0, 0, 0], [2.5, 0, 0]],
                                header='Lattice="1 0 0 2 0 0 0 0 1" Properties=species:S:1:pos:R:3:forces:R:3 '
                                       'energy={energy} pbc="T T T"'), {}, r"singular cell"),
    "mixed_pbc": (xyz_frame(["Na", "Cl"], [[0, 0, 0], [2.5, 0, 0]],
                            header='Lattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3:forces:R:3 '
                                   'energy={energy} pbc="T T F"'), {}, r"mixed periodicity pbc=\[True, True, False\]"),
}


@pytest.mark.parametrize("problem", sorted(SECOND_FRAME_PROBLEMS))
def test_bad_frame_is_reported_with_file_and_index(tmp_path, problem):
    """Each problem in frame 1 (after a good frame 0) raises DataError naming file and frame."""
    text, kwargs, pattern = SECOND_FRAME_PROBLEMS[problem]
    keys = kwargs.get("keys")
    first = GOOD if not keys else GOOD.replace("forces:R:3", "force:R:3")  # frame 0 valid under the same keys
    path = write(tmp_path, f"{problem}.xyz", first + text + GOOD)
    with pytest.raises(DataError, match=pattern) as info:
        read_frames(path, **kwargs)
    assert_names_file_and_frame(info.value, path, 1)


@pytest.mark.parametrize("problem", sorted(SECOND_FRAME_PROBLEMS))
def test_skip_invalid_skips_and_reports(tmp_path, problem):
    """skip_invalid=True drops exactly the bad frame and lists it (index and reason) in the report."""
    text, kwargs, pattern = SECOND_FRAME_PROBLEMS[problem]
    keys = kwargs.get("keys")
    first = GOOD if not keys else GOOD.replace("forces:R:3", "force:R:3")
    last = GOOD if not keys else GOOD.replace("forces:R:3", "force:R:3")
    path = write(tmp_path, f"{problem}.xyz", first + text + last)
    frames, report = read_frames(path, skip_invalid=True, **kwargs)
    assert [f.source for f in frames] == [f"{path}:frame 0", f"{path}:frame 2"]
    assert report.num_frames == 3
    assert [index for index, _ in report.skipped] == [1]
    import re

    assert re.search(pattern, report.skipped[0][1]), report.skipped[0][1]


def test_skip_invalid_reports_several_and_refuses_all_bad(tmp_path):
    bad_energy = xyz_frame(["Na", "Cl"], [[0, 0, 0], [2.5, 0, 0]], energy="nan")
    overlap = xyz_frame(["Na", "Cl"], [[0, 0, 0], [0.0, 0, 0.01]])
    path = write(tmp_path, "mixed_quality.xyz", GOOD + bad_energy + GOOD + overlap + GOOD)
    with pytest.raises(DataError) as info:
        read_frames(path)  # the default never skips
    assert_names_file_and_frame(info.value, path, 1)
    frames, report = read_frames(path, skip_invalid=True)
    assert len(frames) == 3
    assert [i for i, _ in report.skipped] == [1, 3]
    assert "NaN" in report.skipped[0][1] and "overlap" in report.skipped[1][1]

    all_bad = write(tmp_path, "all_bad.xyz", bad_energy + overlap)
    with pytest.raises(DataError, match="every frame was invalid") as info:
        read_frames(all_bad, skip_invalid=True)
    assert str(all_bad) in str(info.value)


def test_skipped_frames_are_announced_by_the_training_data_loader(tmp_path, capsys):
    """The training loader prints every skipped frame (and keeps them in the reports)."""
    import ml_collections

    from polarjax.training.loop import load_datasets

    bad = xyz_frame(["Na", "Cl"], [[0, 0, 0], [2.5, 0, 0]], energy="inf")
    path = write(tmp_path, "train.xyz", GOOD * 4 + bad + GOOD * 5)
    config = ml_collections.ConfigDict(dict(train_file=str(path), valid_file="", test_file="", valid_fraction=0.2,
                                            test_fraction=0.2, split_seed=0, max_train_frames=0, skip_invalid=True,
                                            label_keys=dict(energy="energy", forces="forces")))
    datasets = load_datasets(config)
    assert sum(len(datasets[k]) for k in ("train", "valid", "test")) == 9
    assert datasets["reports"]["train_file"].skipped[0][0] == 4
    out = capsys.readouterr().out
    assert f"skipped {path} frame 4" in out and "NaN or inf" in out

    config.skip_invalid = False
    with pytest.raises(DataError, match="frame 4"):
        load_datasets(config)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="file not found") as info:
        read_frames(tmp_path / "missing.xyz")
    assert "missing.xyz" in str(info.value)

    empty = write(tmp_path, "empty.xyz", "")
    with pytest.raises(DataError, match="file is empty") as info:
        read_frames(empty)
    assert str(empty) in str(info.value)

    blank = write(tmp_path, "blank.xyz", "\n\n\n")
    with pytest.raises(DataError, match="contains no frames") as info:
        read_frames(blank)
    assert str(blank) in str(info.value)

    garbage = write(tmp_path, "garbage.xyz", "this is not a structure file\nat all\n")
    with pytest.raises(DataError, match="could not be parsed") as info:
        read_frames(garbage)
    assert str(garbage) in str(info.value)


@pytest.mark.parametrize("broken, good_before", [
    ('3\nenergy=1.0 pbc="F F F"\nNa 0 0 0\n', 2),  # truncated last frame: fewer atoms than announced
    (xyz_frame(["Na", "Cl"], [[0, 0, 0], [2.5, "x", 0]]) + GOOD, 2),  # non-numeric coordinate
])
def test_unparsable_frame_is_located(tmp_path, broken, good_before):
    path = write(tmp_path, "broken.xyz", GOOD * good_before + broken)
    with pytest.raises(DataError, match="could not be parsed") as info:
        read_frames(path)
    assert str(path) in str(info.value)
    assert f"frame {good_before}" in str(info.value)


def test_unknown_element_vs_model_species(tmp_path):
    text = GOOD + xyz_frame(["Na", "K"], [[0, 0, 0], [3.0, 0, 0]]) + GOOD
    path = write(tmp_path, "with_k.xyz", text)
    frames, _ = read_frames(path)
    assert species_of(frames) == [11, 17, 19]
    check_species(frames, [11, 17, 19])  # fine
    with pytest.raises(DataError, match=r"element\(s\) \['K'\] not in the model's species \['Na', 'Cl'\]") as info:
        check_species(frames, [11, 17])
    assert_names_file_and_frame(info.value, path, 1)


# ----------------------------------------------------------------------------- E0 and splits


def _synthetic_frames(e0_by_z, num_frames, rng, noise=0.0):
    from polarjax.training.dataset import Frame

    frames = []
    species = list(e0_by_z)
    for k in range(num_frames):
        numbers = rng.choice(species, size=rng.integers(2, 9))
        energy = sum(e0_by_z[int(z)] for z in numbers) + noise * rng.normal()
        frames.append(Frame(rng.normal(size=(len(numbers), 3)) * 3, numbers, np.zeros((3, 3)), np.zeros(3, bool),
                            {"energy": np.asarray(energy)}, f"synthetic:frame {k}"))
    return frames


def test_fit_atomic_energies_recovers_known_values():
    rng = np.random.default_rng(1)
    e0 = {1: -13.6, 8: -2041.3, 11: -4420.7, 17: -12577.1}
    frames = _synthetic_frames(e0, 40, rng)
    order = [17, 1, 11, 8]  # the result follows the given species order
    fitted = fit_atomic_energies(frames, order)
    np.testing.assert_allclose(fitted, [e0[z] for z in order], rtol=0, atol=1e-8)

    noisy = fit_atomic_energies(_synthetic_frames(e0, 400, rng, noise=0.05), order)
    np.testing.assert_allclose(noisy, [e0[z] for z in order], rtol=0, atol=0.02)


def test_fit_atomic_energies_single_stoichiometry_is_minimum_norm():
    """Linearly dependent compositions (one stoichiometry): the minimum-norm solution still
    reproduces every total energy."""
    from polarjax.training.dataset import Frame

    frames = [Frame(np.zeros((3, 3)), np.array([11, 17, 11]), np.zeros((3, 3)), np.zeros(3, bool),
                    {"energy": np.asarray(-100.0 + 0.0 * k)}, f"f{k}") for k in range(5)]
    fitted = fit_atomic_energies(frames, [11, 17])
    assert 2 * fitted[0] + fitted[1] == pytest.approx(-100.0)
    np.testing.assert_allclose(fitted, np.array([2, 1]) * -100.0 / 5.0)  # minimum norm: ∝ the composition


def test_split_indices_reproducible_disjoint_covering():
    train, valid, test = split_indices(103, 0.1, 0.2, seed=7)
    again = split_indices(103, 0.1, 0.2, seed=7)
    for a, b in zip((train, valid, test), again):
        np.testing.assert_array_equal(a, b)
    assert (len(train), len(valid), len(test)) == (72, 10, 21)
    union = np.concatenate([train, valid, test])
    assert len(set(union.tolist())) == 103 and sorted(union.tolist()) == list(range(103))
    assert not set(train) & set(valid) and not set(train) & set(test) and not set(valid) & set(test)
    other = split_indices(103, 0.1, 0.2, seed=8)
    assert not np.array_equal(other[1], valid)  # the seed matters
    # no valid/test: everything trains
    train_only = split_indices(10, 0.0, 0.0, seed=0)
    np.testing.assert_array_equal(train_only[0], np.arange(10))
    assert len(train_only[1]) == len(train_only[2]) == 0


@pytest.mark.parametrize("valid, test", [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0), (0.2, 0.9)])
def test_split_indices_rejects_bad_fractions(valid, test):
    with pytest.raises(ValueError, match="invalid split fractions"):
        split_indices(10, valid, test, seed=0)


def test_label_key_overrides_parse_and_refuse_malformed_entries():
    from polarjax.training.dataset import parse_label_keys

    assert parse_label_keys(["forces=force", "bec=BEC"]) == {"forces": "force", "bec": "BEC"}
    assert parse_label_keys([]) == {}
    for bad in ("force", "=force", "forces="):
        with pytest.raises(ValueError, match="name=key"):
            parse_label_keys([bad])
