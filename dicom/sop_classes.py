"""The SOP classes and transfer syntaxes the listener negotiates: constants, no library.

`STORAGE`: the storage SOP classes pynetdicom 3.0 serves (`AllStoragePresentationContexts`),
generated once from it so that the listener imports no protocol library. `TRANSFER_SYNTAXES`:
every transfer syntax pydicom 3.0 knows (`pydicom.uid.AllTransferSyntaxes`); instances are stored
as received, so any encoding is accepted for Storage. `DEFAULT_SYNTAXES` (Verification, C-FIND,
Storage Commitment): those `dicom.identifier` decodes and encodes.
"""

from __future__ import annotations

from typing import Final

VERIFICATION: Final = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.2.1"
FIND_LEVELS: Final = {
    PATIENT_ROOT_FIND: frozenset({"PATIENT", "STUDY", "SERIES", "IMAGE"}),
    STUDY_ROOT_FIND: frozenset({"STUDY", "SERIES", "IMAGE"}),
}
"""The Query/Retrieve Levels of each C-FIND information model (PS3.4 C.6.1, C.6.2: the Study Root
model has no patient level)."""
FIND_MODELS: Final = frozenset(FIND_LEVELS)
PATIENT_ROOT_GET: Final = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_GET: Final = "1.2.840.10008.5.1.4.1.2.2.3"
GET_LEVELS: Final = {
    PATIENT_ROOT_GET: FIND_LEVELS[PATIENT_ROOT_FIND],
    STUDY_ROOT_GET: FIND_LEVELS[STUDY_ROOT_FIND],
}
"""The Query/Retrieve Levels of each C-GET information model (PS3.4 C.6.1.3, C.6.2.3)."""
GET_MODELS: Final = frozenset(GET_LEVELS)
PATIENT_ROOT_MOVE: Final = "1.2.840.10008.5.1.4.1.2.1.2"
STUDY_ROOT_MOVE: Final = "1.2.840.10008.5.1.4.1.2.2.2"
MOVE_LEVELS: Final = {
    PATIENT_ROOT_MOVE: FIND_LEVELS[PATIENT_ROOT_FIND],
    STUDY_ROOT_MOVE: FIND_LEVELS[STUDY_ROOT_FIND],
}
"""The Query/Retrieve Levels of each C-MOVE information model (PS3.4 C.6.1.2, C.6.2.2)."""
MOVE_MODELS: Final = frozenset(MOVE_LEVELS)
RETRIEVE_LEVELS: Final = {**GET_LEVELS, **MOVE_LEVELS}
RETRIEVE_MODELS: Final = frozenset(RETRIEVE_LEVELS)
STORAGE_COMMITMENT: Final = "1.2.840.10008.1.20.1"
"""Storage Commitment Push Model SOP Class (PS3.4 J.3)."""
STORAGE_COMMITMENT_INSTANCE: Final = "1.2.840.10008.1.20.1.1"
"""Its well-known SOP Instance: the Requested SOP Instance of an N-ACTION, the Affected SOP
Instance of the N-EVENT-REPORT."""

IMPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN: Final = "1.2.840.10008.1.2.2"
DEFAULT_SYNTAXES: Final = (
    IMPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
)

TRANSFER_SYNTAXES: Final = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 and 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 1…
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless Image Compression
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Lossy (Near-Lossless) Image Compression
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Image Compression (Lossless Only)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000 Image Compression
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Multi-component Image Compression (Lossless Only)
    "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 Multi-component Image Compression
    "1.2.840.10008.1.2.4.100",  # MPEG2 Main Profile / Main Level
    "1.2.840.10008.1.2.4.100.1",  # Fragmentable MPEG2 Main Profile / Main Level
    "1.2.840.10008.1.2.4.101",  # MPEG2 Main Profile / High Level
    "1.2.840.10008.1.2.4.101.1",  # Fragmentable MPEG2 Main Profile / High Level
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264 High Profile / Level 4.1
    "1.2.840.10008.1.2.4.102.1",  # Fragmentable MPEG-4 AVC/H.264 High Profile / Level 4.1
    "1.2.840.10008.1.2.4.103",  # MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1
    "1.2.840.10008.1.2.4.103.1",  # Fragmentable MPEG-4 AVC/H.264 BD-compatible High Profile / Leve…
    "1.2.840.10008.1.2.4.104",  # MPEG-4 AVC/H.264 High Profile / Level 4.2 For 2D Video
    "1.2.840.10008.1.2.4.104.1",  # Fragmentable MPEG-4 AVC/H.264 High Profile / Level 4.2 For 2D V…
    "1.2.840.10008.1.2.4.105",  # MPEG-4 AVC/H.264 High Profile / Level 4.2 For 3D Video
    "1.2.840.10008.1.2.4.105.1",  # Fragmentable MPEG-4 AVC/H.264 High Profile / Level 4.2 For 3D V…
    "1.2.840.10008.1.2.4.106",  # MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2
    "1.2.840.10008.1.2.4.106.1",  # Fragmentable MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2
    "1.2.840.10008.1.2.4.107",  # HEVC/H.265 Main Profile / Level 5.1
    "1.2.840.10008.1.2.4.108",  # HEVC/H.265 Main 10 Profile / Level 5.1
    "1.2.840.10008.1.2.4.201",  # High-Throughput JPEG 2000 Image Compression (Lossless Only)
    "1.2.840.10008.1.2.4.202",  # High-Throughput JPEG 2000 with RPCL Options Image Compression (Lo…
    "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000 Image Compression
    "1.2.840.10008.1.2.4.204",  # JPIP HTJ2K Referenced
    "1.2.840.10008.1.2.4.205",  # JPIP HTJ2K Referenced Deflate
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.7.1",  # SMPTE ST 2110-20 Uncompressed Progressive Active Video
    "1.2.840.10008.1.2.7.2",  # SMPTE ST 2110-20 Uncompressed Interlaced Active Video
    "1.2.840.10008.1.2.7.3",  # SMPTE ST 2110-30 PCM Digital Audio
)

STORAGE: Final = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Presentatio
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processin
        "1.2.840.10008.5.1.4.1.1.1.3",  # Digital Intra-Oral X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF Storage
        "1.2.840.10008.5.1.4.1.1.104.2",  # Encapsulated CDA Storage
        "1.2.840.10008.5.1.4.1.1.104.3",  # Encapsulated STL Storage
        "1.2.840.10008.5.1.4.1.1.104.4",  # Encapsulated OBJ Storage
        "1.2.840.10008.5.1.4.1.1.104.5",  # Encapsulated MTL Storage
        "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.10",  # Segmented Volume Rendering Volumetric Presentation Stat
        "1.2.840.10008.5.1.4.1.1.11.11",  # Multiple Volume Rendering Volumetric Presentation State
        "1.2.840.10008.5.1.4.1.1.11.12",  # Variable Modality LUT Softcopy Presentation State Stora
        "1.2.840.10008.5.1.4.1.1.11.2",  # Color Softcopy Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.3",  # Pseudo-Color Softcopy Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.4",  # Blending Softcopy Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.5",  # XA/XRF Grayscale Softcopy Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.6",  # Grayscale Planar MPR Volumetric Presentation State Stora
        "1.2.840.10008.5.1.4.1.1.11.7",  # Compositing Planar MPR Volumetric Presentation State Sto
        "1.2.840.10008.5.1.4.1.1.11.8",  # Advanced Blending Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.9",  # Volume Rendering Volumetric Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image Storage
        "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA Image Storage
        "1.2.840.10008.5.1.4.1.1.12.2",  # X-Ray Radiofluoroscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.12.2.1",  # Enhanced XRF Image Storage
        "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image Storage
        "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image Storage
        "1.2.840.10008.5.1.4.1.1.13.1.1",  # X-Ray 3D Angiographic Image Storage
        "1.2.840.10008.5.1.4.1.1.13.1.2",  # X-Ray 3D Craniofacial Image Storage
        "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis Image Storage
        "1.2.840.10008.5.1.4.1.1.13.1.4",  # Breast Projection X-Ray Image Storage - For Presentati
        "1.2.840.10008.5.1.4.1.1.13.1.5",  # Breast Projection X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image Storage
        "1.2.840.10008.5.1.4.1.1.131",  # Basic Structured Display Storage
        "1.2.840.10008.5.1.4.1.1.14.1",  # Intravascular Optical Coherence Tomography Image Storage
        "1.2.840.10008.5.1.4.1.1.14.2",  # Intravascular Optical Coherence Tomography Image Storage
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image Storage
        "1.2.840.10008.5.1.4.1.1.200.2",  # CT Performed Procedure Protocol Storage
        "1.2.840.10008.5.1.4.1.1.200.8",  # XA Performed Procedure Protocol Storage
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
        "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map Storage
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy Storage
        "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image Storage
        "1.2.840.10008.5.1.4.1.1.481.10",  # RT Physician Intent Storage
        "1.2.840.10008.5.1.4.1.1.481.11",  # RT Segment Annotation Storage
        "1.2.840.10008.5.1.4.1.1.481.12",  # RT Radiation Set Storage
        "1.2.840.10008.5.1.4.1.1.481.13",  # C-Arm Photon-Electron Radiation Storage
        "1.2.840.10008.5.1.4.1.1.481.14",  # Tomotherapeutic Radiation Storage
        "1.2.840.10008.5.1.4.1.1.481.15",  # Robotic-Arm Radiation Storage
        "1.2.840.10008.5.1.4.1.1.481.16",  # RT Radiation Record Set Storage
        "1.2.840.10008.5.1.4.1.1.481.17",  # RT Radiation Salvage Record Storage
        "1.2.840.10008.5.1.4.1.1.481.18",  # Tomotherapeutic Radiation Record Storage
        "1.2.840.10008.5.1.4.1.1.481.19",  # C-Arm Photon-Electron Radiation Record Storage
        "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose Storage
        "1.2.840.10008.5.1.4.1.1.481.20",  # Robotic Radiation Record Storage
        "1.2.840.10008.5.1.4.1.1.481.21",  # RT Radiation Set Delivery Instruction Storage
        "1.2.840.10008.5.1.4.1.1.481.22",  # RT Treatment Preparation Storage
        "1.2.840.10008.5.1.4.1.1.481.23",  # Enhanced RT Image Storage
        "1.2.840.10008.5.1.4.1.1.481.24",  # Enhanced Continuous RT Image Storage
        "1.2.840.10008.5.1.4.1.1.481.25",  # RT Patient Position Acquisition Instruction Storage
        "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set Storage
        "1.2.840.10008.5.1.4.1.1.481.4",  # RT Beams Treatment Record Storage
        "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan Storage
        "1.2.840.10008.5.1.4.1.1.481.6",  # RT Brachy Treatment Record Storage
        "1.2.840.10008.5.1.4.1.1.481.7",  # RT Treatment Summary Record Storage
        "1.2.840.10008.5.1.4.1.1.481.8",  # RT Ion Plan Storage
        "1.2.840.10008.5.1.4.1.1.481.9",  # RT Ion Beams Treatment Record Storage
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
        "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume Storage
        "1.2.840.10008.5.1.4.1.1.6.3",  # Photoacoustic Image Storage
        "1.2.840.10008.5.1.4.1.1.66",  # Raw Data Storage
        "1.2.840.10008.5.1.4.1.1.66.1",  # Spatial Registration Storage
        "1.2.840.10008.5.1.4.1.1.66.2",  # Spatial Fiducials Storage
        "1.2.840.10008.5.1.4.1.1.66.3",  # Deformable Spatial Registration Storage
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.66.5",  # Surface Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.66.6",  # Tractography Results Storage
        "1.2.840.10008.5.1.4.1.1.66.7",  # 1.2.840.10008.5.1.4.1.1.66.7
        "1.2.840.10008.5.1.4.1.1.66.8",  # 1.2.840.10008.5.1.4.1.1.66.8
        "1.2.840.10008.5.1.4.1.1.67",  # Real World Value Mapping Storage
        "1.2.840.10008.5.1.4.1.1.68.1",  # Surface Scan Mesh Storage
        "1.2.840.10008.5.1.4.1.1.68.2",  # Surface Scan Point Cloud Storage
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture Image Storag
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture Image Storag
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Endoscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.2",  # VL Microscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.2.1",  # Video Microscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.3",  # VL Slide-Coordinates Microscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.5.1",  # Ophthalmic Photography 8 Bit Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.5.2",  # Ophthalmic Photography 16 Bit Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.5.3",  # Stereometric Relationship Storage
        "1.2.840.10008.5.1.4.1.1.77.1.5.4",  # Ophthalmic Tomography Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.5.5",  # Wide Field Ophthalmic Photography Stereographic Proj
        "1.2.840.10008.5.1.4.1.1.77.1.5.6",  # Wide Field Ophthalmic Photography 3D Coordinates Ima
        "1.2.840.10008.5.1.4.1.1.77.1.5.7",  # Ophthalmic Optical Coherence Tomography En Face Imag
        "1.2.840.10008.5.1.4.1.1.77.1.5.8",  # Ophthalmic Optical Coherence Tomography B-scan Volum
        "1.2.840.10008.5.1.4.1.1.77.1.6",  # VL Whole Slide Microscopy Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.7",  # Dermoscopic Photography Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.8",  # Confocal Microscopy Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.9",  # Confocal Microscopy Tiled Pyramidal Image Storage
        "1.2.840.10008.5.1.4.1.1.78.1",  # Lensometry Measurements Storage
        "1.2.840.10008.5.1.4.1.1.78.2",  # Autorefraction Measurements Storage
        "1.2.840.10008.5.1.4.1.1.78.3",  # Keratometry Measurements Storage
        "1.2.840.10008.5.1.4.1.1.78.4",  # Subjective Refraction Measurements Storage
        "1.2.840.10008.5.1.4.1.1.78.5",  # Visual Acuity Measurements Storage
        "1.2.840.10008.5.1.4.1.1.78.6",  # Spectacle Prescription Report Storage
        "1.2.840.10008.5.1.4.1.1.78.7",  # Ophthalmic Axial Measurements Storage
        "1.2.840.10008.5.1.4.1.1.78.8",  # Intraocular Lens Calculations Storage
        "1.2.840.10008.5.1.4.1.1.79.1",  # Macular Grid Thickness and Volume Report Storage
        "1.2.840.10008.5.1.4.1.1.80.1",  # Ophthalmic Visual Field Static Perimetry Measurements St
        "1.2.840.10008.5.1.4.1.1.81.1",  # Ophthalmic Thickness Map Storage
        "1.2.840.10008.5.1.4.1.1.82.1",  # Corneal Topography Map Storage
        "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR Storage
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR Storage
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR Storage
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR Storage
        "1.2.840.10008.5.1.4.1.1.88.35",  # Extensible SR Storage
        "1.2.840.10008.5.1.4.1.1.88.40",  # Procedure Log Storage
        "1.2.840.10008.5.1.4.1.1.88.50",  # Mammography CAD SR Storage
        "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document Storage
        "1.2.840.10008.5.1.4.1.1.88.65",  # Chest CAD SR Storage
        "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR Storage
        "1.2.840.10008.5.1.4.1.1.88.68",  # Radiopharmaceutical Radiation Dose SR Storage
        "1.2.840.10008.5.1.4.1.1.88.69",  # Colon CAD SR Storage
        "1.2.840.10008.5.1.4.1.1.88.70",  # Implantation Plan SR Storage
        "1.2.840.10008.5.1.4.1.1.88.71",  # Acquisition Context SR Storage
        "1.2.840.10008.5.1.4.1.1.88.72",  # Simplified Adult Echo SR Storage
        "1.2.840.10008.5.1.4.1.1.88.73",  # Patient Radiation Dose SR Storage
        "1.2.840.10008.5.1.4.1.1.88.74",  # Planned Imaging Agent Administration SR Storage
        "1.2.840.10008.5.1.4.1.1.88.75",  # Performed Imaging Agent Administration SR Storage
        "1.2.840.10008.5.1.4.1.1.88.76",  # Enhanced X-Ray Radiation Dose SR Storage
        "1.2.840.10008.5.1.4.1.1.88.77",  # Waveform Annotation SR Storage
        "1.2.840.10008.5.1.4.1.1.9.1.1",  # 12-lead ECG Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.1.2",  # General ECG Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.1.3",  # Ambulatory ECG Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.1.4",  # General 32-bit ECG Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.100.1",  # 1.2.840.10008.5.1.4.1.1.9.100.1
        "1.2.840.10008.5.1.4.1.1.9.100.2",  # 1.2.840.10008.5.1.4.1.1.9.100.2
        "1.2.840.10008.5.1.4.1.1.9.2.1",  # Hemodynamic Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.3.1",  # Cardiac Electrophysiology Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.4.1",  # Basic Voice Audio Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.4.2",  # General Audio Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.5.1",  # Arterial Pulse Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.6.1",  # Respiratory Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.6.2",  # Multi-channel Respiratory Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.7.1",  # Routine Scalp Electroencephalogram Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.7.2",  # Electromyogram Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.7.3",  # Electrooculogram Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.7.4",  # Sleep Electroencephalogram Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.8.1",  # Body Position Waveform Storage
        "1.2.840.10008.5.1.4.1.1.90.1",  # Content Assessment Results Storage
        "1.2.840.10008.5.1.4.1.1.91.1",  # Microscopy Bulk Simple Annotations Storage
        "1.2.840.10008.5.1.4.34.10",  # RT Brachy Application Setup Delivery Instruction Storage
        "1.2.840.10008.5.1.4.34.7",  # RT Beams Delivery Instruction Storage
    }
)
