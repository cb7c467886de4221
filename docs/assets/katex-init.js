// Renders the formulas that pymdownx.arithmatex (generic mode) leaves in the page, \(...\) in a
// span.arithmatex and \[...\] in a div.arithmatex, with the KaTeX served from the site itself
// (no CDN: the site works offline).
(function () {
  "use strict";

  function renderFormulas(root) {
    root.querySelectorAll(".arithmatex").forEach(function (element) {
      var tex = element.textContent.trim();
      var display = element.tagName === "DIV";
      tex = tex.replace(/^\\[(\[]/, "").replace(/\\[)\]]$/, "");
      katex.render(tex, element, { displayMode: display, throwOnError: false });
    });
  }

  // Material's instant navigation swaps pages without a reload and announces each through
  // document$; without it, the page is rendered once when loaded.
  if (typeof document$ !== "undefined") {
    document$.subscribe(function () { renderFormulas(document); });
  } else {
    document.addEventListener("DOMContentLoaded", function () { renderFormulas(document); });
  }
})();
