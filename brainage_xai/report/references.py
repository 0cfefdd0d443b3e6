"""The works the methods text cites: one entry per work, as text and as BibTeX.

:mod:`brainage_xai.report.methods` names the entries its sentences cite (by key), so the
report's reference list, ``CITATION.md`` and ``CITATION.bib`` list exactly the works that
the text of a run mentions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    """One cited work: ``key`` (the BibTeX key), ``text`` (for reading), ``bibtex``."""

    key: str
    text: str
    bibtex: str


def _ref(key: str, text: str, kind: str, **fields: str) -> Reference:
    body = ",\n".join(f"  {name} = {{{value}}}" for name, value in fields.items())
    return Reference(key, text, f"@{kind}{{{key},\n{body}\n}}\n")


_ALL = (
    _ref("brainagexai_method",
         "Interpreting age predictions from brain maps via deep neural activations and tensor "
         "decomposition. Anonymous authors, paper under double-blind review.",
         "unpublished",
         title="Interpreting age predictions from brain maps via deep neural activations and "
               "tensor decomposition",
         author="{Anonymous authors}",
         note="Paper under double-blind review"),
    _ref("gorgolewski2017bids",
         "Gorgolewski KJ et al. (2017). BIDS apps: improving ease of use, accessibility, and "
         "reproducibility of neuroimaging data analysis methods. PLoS Comput Biol 13(3):e1005209.",
         "article",
         title="{BIDS} apps: Improving ease of use, accessibility, and reproducibility of "
               "neuroimaging data analysis methods",
         author="Gorgolewski, Krzysztof J. and others",
         journal="PLoS Computational Biology", volume="13", number="3", pages="e1005209",
         year="2017", doi="10.1371/journal.pcbi.1005209"),
    _ref("makris2006harvardoxford",
         "Makris N, Goldstein JM, Kennedy D et al. (2006). Decreased volume of left and total "
         "anterior insular lobule in schizophrenia. Schizophr Res 83(2-3):155-171.",
         "article",
         title="Decreased volume of left and total anterior insular lobule in schizophrenia",
         author="Makris, Nikos and Goldstein, Jill M. and Kennedy, David and others",
         journal="Schizophrenia Research", volume="83", number="2-3", pages="155--171",
         year="2006", doi="10.1016/j.schres.2005.11.020"),
    _ref("desikan2006",
         "Desikan RS, Segonne F, Fischl B et al. (2006). An automated labeling system for "
         "subdividing the human cerebral cortex on MRI scans into gyral based regions of "
         "interest. NeuroImage 31(3):968-980.",
         "article",
         title="An automated labeling system for subdividing the human cerebral cortex on {MRI} "
               "scans into gyral based regions of interest",
         author="Desikan, Rahul S. and S{\\'e}gonne, Florent and Fischl, Bruce and others",
         journal="NeuroImage", volume="31", number="3", pages="968--980", year="2006",
         doi="10.1016/j.neuroimage.2006.01.021"),
    _ref("fonov2011",
         "Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, Collins DL (2011). Unbiased "
         "average age-appropriate atlases for pediatric studies. NeuroImage 54(1):313-327.",
         "article",
         title="Unbiased average age-appropriate atlases for pediatric studies",
         author="Fonov, Vladimir and Evans, Alan C. and Botteron, Kelly and Almli, C. Robert "
                "and McKinstry, Robert C. and Collins, D. Louis",
         journal="NeuroImage", volume="54", number="1", pages="313--327", year="2011",
         doi="10.1016/j.neuroimage.2010.07.033"),
    _ref("ciric2022templateflow",
         "Ciric R et al. (2022). TemplateFlow: FAIR-sharing of multi-scale, multi-species brain "
         "models. Nat Methods 19:1568-1571.",
         "article",
         title="{TemplateFlow}: {FAIR}-sharing of multi-scale, multi-species brain models",
         author="Ciric, Rastko and others", journal="Nature Methods", volume="19",
         pages="1568--1571", year="2022", doi="10.1038/s41592-022-01681-2"),
    _ref("yarkoni2019pybids",
         "Yarkoni T et al. (2019). PyBIDS: Python tools for BIDS datasets. J Open Source Softw "
         "4(40):1294.",
         "article",
         title="{PyBIDS}: Python tools for {BIDS} datasets", author="Yarkoni, Tal and others",
         journal="Journal of Open Source Software", volume="4", number="40", pages="1294",
         year="2019", doi="10.21105/joss.01294"),
    _ref("brett_nibabel",
         "Brett M et al. NiBabel: access a cacophony of neuro-imaging file formats. Zenodo, "
         "doi:10.5281/zenodo.591597.",
         "misc",
         title="{NiBabel}: access a cacophony of neuro-imaging file formats",
         author="Brett, Matthew and others", publisher="Zenodo", doi="10.5281/zenodo.591597"),
    _ref("abraham2014nilearn",
         "Abraham A et al. (2014). Machine learning for neuroimaging with scikit-learn. Front "
         "Neuroinform 8:14.",
         "article",
         title="Machine learning for neuroimaging with scikit-learn",
         author="Abraham, Alexandre and others", journal="Frontiers in Neuroinformatics",
         volume="8", pages="14", year="2014", doi="10.3389/fninf.2014.00014"),
    _ref("paszke2019pytorch",
         "Paszke A et al. (2019). PyTorch: an imperative style, high-performance deep learning "
         "library. NeurIPS 32.",
         "inproceedings",
         title="{PyTorch}: An imperative style, high-performance deep learning library",
         author="Paszke, Adam and others",
         booktitle="Advances in Neural Information Processing Systems 32", year="2019"),
    _ref("pedregosa2011sklearn",
         "Pedregosa F et al. (2011). Scikit-learn: machine learning in Python. J Mach Learn Res "
         "12:2825-2830.",
         "article",
         title="Scikit-learn: Machine learning in {P}ython", author="Pedregosa, Fabian and others",
         journal="Journal of Machine Learning Research", volume="12", pages="2825--2830",
         year="2011"),
    _ref("akiba2019optuna",
         "Akiba T, Sano S, Yanase T, Ohta T, Koyama M (2019). Optuna: a next-generation "
         "hyperparameter optimization framework. KDD.",
         "inproceedings",
         title="Optuna: A next-generation hyperparameter optimization framework",
         author="Akiba, Takuya and Sano, Shotaro and Yanase, Toshihiko and Ohta, Takeru and "
                "Koyama, Masanori",
         booktitle="Proceedings of the 25th ACM SIGKDD International Conference on Knowledge "
                   "Discovery and Data Mining", pages="2623--2631", year="2019",
         doi="10.1145/3292500.3330701"),
    _ref("he2016identity",
         "He K, Zhang X, Ren S, Sun J (2016). Identity mappings in deep residual networks. ECCV.",
         "inproceedings",
         title="Identity mappings in deep residual networks",
         author="He, Kaiming and Zhang, Xiangyu and Ren, Shaoqing and Sun, Jian",
         booktitle="European Conference on Computer Vision (ECCV)", pages="630--645",
         year="2016", doi="10.1007/978-3-319-46493-0_38"),
    _ref("kossaifi2016tensorly",
         "Kossaifi J, Panagakis Y, Anandkumar A, Pantic M (2016). TensorLy: tensor learning in "
         "Python. arXiv:1610.09555.",
         "misc",
         title="{TensorLy}: Tensor learning in {P}ython",
         author="Kossaifi, Jean and Panagakis, Yannis and Anandkumar, Anima and Pantic, Maja",
         year="2016", eprint="1610.09555", archivePrefix="arXiv"),
    _ref("zhou2015nntucker",
         "Zhou G, Cichocki A, Zhao Q, Xie S (2015). Efficient nonnegative Tucker decompositions: "
         "algorithms and uniqueness. IEEE Trans Image Process 24(12):4990-5003.",
         "article",
         title="Efficient nonnegative {T}ucker decompositions: Algorithms and uniqueness",
         author="Zhou, Guoxu and Cichocki, Andrzej and Zhao, Qibin and Xie, Shengli",
         journal="IEEE Transactions on Image Processing", volume="24", number="12",
         pages="4990--5003", year="2015", doi="10.1109/TIP.2015.2478396"),
    _ref("cichocki2007hals",
         "Cichocki A, Zdunek R, Amari S (2007). Hierarchical ALS algorithms for nonnegative "
         "matrix and 3D tensor factorization. ICA 2007, LNCS 4666:169-176.",
         "inproceedings",
         title="Hierarchical {ALS} algorithms for nonnegative matrix and {3D} tensor factorization",
         author="Cichocki, Andrzej and Zdunek, Rafal and Amari, Shun-ichi",
         booktitle="Independent Component Analysis and Signal Separation (ICA 2007)",
         series="LNCS", volume="4666", pages="169--176", year="2007"),
    _ref("satopaa2011kneedle",
         "Satopaa V, Albrecht J, Irwin D, Raghavan B (2011). Finding a 'kneedle' in a haystack: "
         "detecting knee points in system behavior. ICDCS Workshops.",
         "inproceedings",
         title="Finding a ``Kneedle'' in a haystack: Detecting knee points in system behavior",
         author="Satopaa, Ville and Albrecht, Jeannie and Irwin, David and Raghavan, Barath",
         booktitle="31st International Conference on Distributed Computing Systems Workshops",
         pages="166--171", year="2011", doi="10.1109/ICDCSW.2011.20"),
    _ref("selvaraju2017gradcam",
         "Selvaraju RR et al. (2017). Grad-CAM: visual explanations from deep networks via "
         "gradient-based localization. ICCV.",
         "inproceedings",
         title="Grad-{CAM}: Visual explanations from deep networks via gradient-based localization",
         author="Selvaraju, Ramprasaath R. and others",
         booktitle="IEEE International Conference on Computer Vision (ICCV)", pages="618--626",
         year="2017", doi="10.1109/ICCV.2017.74"),
    _ref("zhou2016cam",
         "Zhou B, Khosla A, Lapedriza A, Oliva A, Torralba A (2016). Learning deep features for "
         "discriminative localization. CVPR.",
         "inproceedings",
         title="Learning deep features for discriminative localization",
         author="Zhou, Bolei and Khosla, Aditya and Lapedriza, Agata and Oliva, Aude and "
                "Torralba, Antonio",
         booktitle="IEEE Conference on Computer Vision and Pattern Recognition (CVPR)",
         pages="2921--2929", year="2016", doi="10.1109/CVPR.2016.319"),
    _ref("kokhlikyan2020captum",
         "Kokhlikyan N et al. (2020). Captum: a unified and generic model interpretability "
         "library for PyTorch. arXiv:2009.07896.",
         "misc",
         title="Captum: A unified and generic model interpretability library for {PyTorch}",
         author="Kokhlikyan, Narine and others", year="2020", eprint="2009.07896",
         archivePrefix="arXiv"),
    _ref("brunet2004consensus",
         "Brunet JP, Tamayo P, Golub TR, Mesirov JP (2004). Metagenes and molecular pattern "
         "discovery using matrix factorization. PNAS 101(12):4164-4169.",
         "article",
         title="Metagenes and molecular pattern discovery using matrix factorization",
         author="Brunet, Jean-Philippe and Tamayo, Pablo and Golub, Todd R. and Mesirov, Jill P.",
         journal="Proceedings of the National Academy of Sciences", volume="101", number="12",
         pages="4164--4169", year="2004", doi="10.1073/pnas.0308531101"),
    _ref("himberg2004icasso",
         "Himberg J, Hyvärinen A, Esposito F (2004). Validating the independent components of "
         "neuroimaging time series via clustering and visualization. NeuroImage 22(3):1214-1222.",
         "article",
         title="Validating the independent components of neuroimaging time series via "
               "clustering and visualization",
         author="Himberg, Johan and Hyv{\\\"a}rinen, Aapo and Esposito, Fabrizio",
         journal="NeuroImage", volume="22", number="3", pages="1214--1222", year="2004",
         doi="10.1016/j.neuroimage.2004.03.027"),
    _ref("smith2019bias",
         "Smith SM, Vidaurre D, Alfaro-Almagro F, Nichols TE, Miller KL (2019). Estimation of "
         "brain age delta from brain imaging. NeuroImage 200:528-539.",
         "article",
         title="Estimation of brain age delta from brain imaging",
         author="Smith, Stephen M. and Vidaurre, Diego and Alfaro-Almagro, Fidel and Nichols, "
                "Thomas E. and Miller, Karla L.",
         journal="NeuroImage", volume="200", pages="528--539", year="2019",
         doi="10.1016/j.neuroimage.2019.06.017"),
)

#: Every work the methods text may cite, by BibTeX key.
REFERENCES: dict[str, Reference] = {ref.key: ref for ref in _ALL}
