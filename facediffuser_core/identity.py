"""Identity as a number: how closely the faces of generated pictures match the reference faces, per subject.

For one picture, every detected face is compared with every reference face (one reference per subject, in
the order of the prompt's <|image|> markers) by the cosine similarity of their face-recognition embeddings.
Faces are then given to subjects one-to-one by the assignment with the largest total similarity (the
Hungarian method; a greedy choice can give a face to the wrong subject when two people look alike). Per
subject the result is:

- `similarity`: cosine similarity of the subject's reference and its assigned face, or None when `missing`;
- `missing`: no face was left for the subject (fewer faces than subjects);
- `mixed`: the assigned face is more similar to another subject's reference than to its own, the sign of
  identities blending into each other;
- `same_person`: the similarity reaches the recognition model's same-person threshold (THRESHOLDS).

A picture's `score` is its weakest subject's similarity (MISSING_SIMILARITY, the lowest cosine, when a
subject is missing), so a picture is only as good as the worst-kept person in it; best-of-N ranks by it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import face_crop

# The lowest cosine similarity: what a subject without a face counts as in the picture's score.
MISSING_SIMILARITY = -1.0


@dataclass(frozen=True)
class SamePersonThreshold:
    """The cosine similarity from which a recognition model's two embeddings are taken as one person."""

    similarity: float
    source: str


DLIB_MODEL = "dlib_face_recognition_resnet_model_v1"
ARCFACE_FAMILY = "arcface"

# Each model's same-person threshold on the cosine similarity of its embeddings, and where it comes from.
THRESHOLDS = {
    DLIB_MODEL: SamePersonThreshold(
        0.93,
        "deepface's published threshold for dlib's ResNet (serengil/deepface, deepface/config/threshold.py: cosine "
        "distance 0.07, i.e. similarity 0.93). dlib's own rule is a Euclidean distance below 0.6 between the raw "
        "128-d descriptors (dlib.net, face_recognition.py example, 99.38% on LFW); its descriptors have norms near "
        "1.45, where that distance is a cosine of about 0.91-0.93, and on the test photos both rules agree on every pair.",
    ),
    "w600k_r50": SamePersonThreshold(
        0.28,
        "insightface's own face-verification demo for buffalo_l's w600k_r50.onnx (deepinsight/insightface, "
        "web-demos/src_recognition/main.py): cosine similarity 0.28 or more is the same person, 0.20 to 0.28 likely.",
    ),
    "glintr100": SamePersonThreshold(
        0.28,
        "no value is published for antelopev2's glintr100.onnx; it is an ArcFace model like buffalo_l's "
        "w600k_r50.onnx (same loss, margin and 512-d normalised embedding), so insightface's demo threshold for that "
        "model (0.28, web-demos/src_recognition/main.py) is used.",
    ),
    ARCFACE_FAMILY: SamePersonThreshold(
        0.28,
        "an insightface recognition model without a published threshold: insightface's demo threshold for "
        "ArcFace models (0.28 with w600k_r50.onnx, web-demos/src_recognition/main.py) is assumed.",
    ),
}


def threshold_for(model: str) -> SamePersonThreshold:
    """The model's threshold; other insightface recognition models get the ArcFace family's."""
    return THRESHOLDS.get(model, THRESHOLDS[ARCFACE_FAMILY])


def cosine_similarity_matrix(references: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(S, D) reference embeddings x (F, D) face embeddings -> (S, F) cosine similarities."""
    references, faces = (np.asarray(rows, dtype=np.float64) for rows in (references, faces))
    if references.ndim != 2 or faces.ndim != 2 or references.shape[1] != faces.shape[1]:
        raise ValueError(f"embeddings of different widths: references {references.shape}, faces {faces.shape}")

    def unit(rows: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return rows / np.maximum(norms, np.finfo(np.float64).tiny)

    return unit(references) @ unit(faces).T


def optimal_assignment(similarity: np.ndarray) -> list[int | None]:
    """For each row (subject), the column (face) it gets, so that no column is used twice and the summed
    similarity is the largest possible; None for the rows left without a column when there are more rows.

    The Hungarian method with potentials (O(n^2 m) for n <= m), on costs = -similarity.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    rows, columns = similarity.shape
    if rows == 0 or columns == 0:
        return [None] * rows
    if rows > columns:
        by_column = optimal_assignment(similarity.T)
        result: list[int | None] = [None] * rows
        for column, row in enumerate(by_column):
            result[row] = column
        return result
    cost = -similarity
    # 1-based as in the textbook formulation: index 0 is the virtual column from which each row is added.
    row_potential = np.zeros(rows + 1)
    column_potential = np.zeros(columns + 1)
    row_of_column = np.zeros(columns + 1, dtype=int)  # 0: column free
    previous_column = np.zeros(columns + 1, dtype=int)
    for row in range(1, rows + 1):
        row_of_column[0] = row
        column = 0
        slack = np.full(columns + 1, np.inf)
        visited = np.zeros(columns + 1, dtype=bool)
        while True:
            visited[column] = True
            current_row = row_of_column[column]
            free = ~visited
            free[0] = False
            reduced = cost[current_row - 1] - row_potential[current_row] - column_potential[1:]
            improved = free[1:] & (reduced < slack[1:])
            slack[1:][improved] = reduced[improved]
            previous_column[1:][improved] = column
            candidates = np.flatnonzero(free)
            next_column = candidates[np.argmin(slack[candidates])]
            delta = slack[next_column]
            row_potential[row_of_column[visited]] += delta
            column_potential[visited] -= delta
            slack[free] -= delta
            column = next_column
            if row_of_column[column] == 0:
                break
        while column:  # flip the augmenting path back to the virtual column
            before = previous_column[column]
            row_of_column[column] = row_of_column[before]
            column = before
    result = [None] * rows
    for column in range(1, columns + 1):
        if row_of_column[column]:
            result[row_of_column[column] - 1] = column - 1
    return result


def greedy_min_similarity(similarity: np.ndarray) -> float:
    """FastComposer's multi-subject identity score of one picture: subjects and faces matched greedily
    (the most similar remaining pair first, each used once), the score the lowest matched similarity, and a
    subject left without a face scoring 0."""
    remaining = np.array(similarity, dtype=np.float64)
    subjects, faces = remaining.shape
    if subjects == 0:
        return 0.0
    matched = []
    for _ in range(min(subjects, faces)):
        subject, face = np.unravel_index(np.argmax(remaining), remaining.shape)
        matched.append(float(remaining[subject, face]))
        remaining[subject, :] = -np.inf
        remaining[:, face] = -np.inf
    return min(matched + [0.0] * (subjects - len(matched)))


@dataclass
class SubjectResult:
    subject: int  # index of the reference, in marker order
    face: int | None  # index into the picture's detected faces
    similarity: float | None
    missing: bool
    mixed: bool
    closest_subject: int | None  # the subject whose reference the assigned face resembles most
    same_person: bool

    def to_json(self, boxes: Sequence[Sequence[float]]) -> dict:
        return {
            "subject": self.subject,
            "similarity": self.similarity,
            "missing": self.missing,
            "mixed": self.mixed,
            "same_person": self.same_person,
            "closest_subject": self.closest_subject,
            "face": self.face,
            "box": None if self.face is None else [round(float(v), 1) for v in boxes[self.face]],
        }


def assign_subjects(similarity: np.ndarray, threshold: float) -> list[SubjectResult]:
    """Per subject (row of the (S, F) similarity matrix): its face, similarity and flags."""
    similarity = np.asarray(similarity, dtype=np.float64)
    results = []
    for subject, face in enumerate(optimal_assignment(similarity)):
        if face is None:
            results.append(SubjectResult(subject, None, None, True, False, None, False))
            continue
        value = float(similarity[subject, face])
        closest = int(np.argmax(similarity[:, face]))
        mixed = bool(np.any(np.delete(similarity[:, face], subject) > value))
        results.append(SubjectResult(subject, face, value, False, mixed, closest, value >= threshold))
    return results


def picture_score(subjects: Sequence[SubjectResult]) -> float:
    """The weakest subject's similarity; a missing subject counts as MISSING_SIMILARITY."""
    return min((MISSING_SIMILARITY if s.similarity is None else s.similarity for s in subjects), default=MISSING_SIMILARITY)


def best_first(scores: Sequence[float]) -> list[int]:
    """Indices ordered by score, highest first; equal scores keep their batch order."""
    return sorted(range(len(scores)), key=lambda index: (-scores[index], index))


@dataclass
class ImageResult:
    batch_index: int
    boxes: list[tuple[float, float, float, float]]  # every face detected in the picture, (x1, y1, x2, y2)
    subjects: list[SubjectResult]
    score: float
    rank: int = 0  # 0 = best of the batch
    similarity: list[list[float]] = field(default_factory=list)  # (subjects, faces) cosine similarities

    def summary(self) -> str:
        """The picture's result in a few words, for labels on pictures."""
        if not self.boxes:
            return "no face found"
        missing = [f"S{s.subject + 1}" for s in self.subjects if s.missing]
        if missing:
            return f"missing {' '.join(missing)}"
        return f"score {self.score:.2f}" + (" mixed" if any(s.mixed for s in self.subjects) else "")

    def to_json(self, model: str, threshold: float) -> dict:
        return {
            "batch_index": self.batch_index,
            "rank": self.rank,
            "score": self.score,
            "faces": len(self.boxes),
            "model": model,
            "threshold": threshold,
            "subjects": [subject.to_json(self.boxes) for subject in self.subjects],
            "similarity": self.similarity,
        }


@dataclass
class IdentityReport:
    """The identity results of a batch of pictures, in batch order, with the model that measured them."""

    model: str
    description: str  # the recognition backend in words, for the table
    threshold: SamePersonThreshold
    images: list[ImageResult] = field(default_factory=list)

    @property
    def scores(self) -> list[float]:
        return [image.score for image in self.images]

    def order(self) -> list[int]:
        """Batch indices, best picture first."""
        return best_first(self.scores)

    def to_json(self) -> list[dict]:
        return [image.to_json(self.model, self.threshold.similarity) for image in self.images]

    def table(self) -> str:
        lines = [f"Identity by {self.description}; same person at cosine similarity >= {self.threshold.similarity:.2f}.",
                 "Subjects are numbered from 1 in the order of the <|image|> markers; score = the weakest subject."]
        for image in self.images:
            faces = f"{len(image.boxes)} face(s)" if image.boxes else "no face found"
            lines.append(f"image {image.batch_index} (rank {image.rank + 1} of {len(self.images)}): score {image.score:.3f}, {faces}")
            for subject in image.subjects:
                lines.append(f"  subject {subject.subject + 1}: {describe(subject)}")
        return "\n".join(lines)


def describe(subject: SubjectResult) -> str:
    if subject.missing:
        return "missing (no face left for this subject)"
    verdict = "same person" if subject.same_person else "below the same-person threshold"
    text = f"{subject.similarity:.3f} {verdict}"
    if subject.mixed:
        text += f", MIXED: the face is closer to subject {subject.closest_subject + 1}'s reference"
    return text


def score_picture(batch_index: int, references: np.ndarray, faces: Sequence, threshold: float) -> ImageResult:
    """One picture: `faces` are objects with `.box` and `.embedding` (facediffuser_core.recognition.Face)."""
    embeddings = np.stack([face.embedding for face in faces]) if faces else np.zeros((0, references.shape[1]))
    similarity = cosine_similarity_matrix(references, embeddings)
    subjects = assign_subjects(similarity, threshold)
    return ImageResult(batch_index, [tuple(face.box) for face in faces], subjects, picture_score(subjects),
                       similarity=[[round(float(value), 4) for value in row] for row in similarity])


def measure_identity(recognizer, references: Sequence[np.ndarray], pictures: Sequence[np.ndarray],
                     on_picture: Callable[[int], None] | None = None, choose_face: str = "largest",
                     face_index: int = 0) -> IdentityReport:
    """Scores each picture (RGB uint8 arrays) against the reference photos with `recognizer`
    (facediffuser_core.recognition). Each reference photo's face is chosen as Encode Reference Faces chooses it
    (face_crop.choose_face: the largest, or the face_index-th from the left), so that the score is about the
    person that was encoded. `on_picture(i)` is called before picture i, for progress and cancelling."""
    if not references:
        raise ValueError("no reference photos given")
    reference_embeddings = []
    for index, photo in enumerate(references):
        faces = recognizer.faces(photo)
        if not faces:
            raise ValueError(
                f"no face found in reference photo {index} (counting from 0). Give a photo in which the whole head is "
                "visible: a crop cut tight around the face can hide it from the detector."
            )
        try:
            chosen = face_crop.choose_face([face.box for face in faces], choose_face, face_index)
        except ValueError as error:
            raise ValueError(f"reference photo {index}: {error}") from error
        reference_embeddings.append(faces[chosen].embedding)
    stacked = np.stack(reference_embeddings)
    threshold = threshold_for(recognizer.model)
    report = IdentityReport(recognizer.model, recognizer.description, threshold)
    for index, picture in enumerate(pictures):
        if on_picture is not None:
            on_picture(index)
        report.images.append(score_picture(index, stacked, recognizer.faces(picture), threshold.similarity))
    for rank, index in enumerate(report.order()):
        report.images[index].rank = rank
    return report
