from setuptools import find_packages, setup

setup(
    name='gplq_mmdet',
    version='0.1.0',
    description='GPLQ 4-bit (W4A4) quantization of vision-transformer '
    'detectors as an MMDetection 3.x plugin',
    packages=find_packages(include=['gplq_mmdet', 'gplq_mmdet.*']),
    python_requires='>=3.10',
    install_requires=[
        'torch>=2.6',
        'mmengine>=0.10.7',
        'mmcv>=2.0.0,<2.2.0',
        'mmdet>=3.3.0',
        'timm>=1.0',
        'pycocotools',
        'numpy',
    ],
)
