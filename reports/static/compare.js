/* convlens compare report: filters and pages of the changed-predictions gallery
 * (index.html), keyboard navigation between image pages.  No network, no innerHTML:
 * the cards are in the page; this only hides and shows them. */
(function () {
  "use strict";

  function typing(ev) {
    var t = ev.target;
    var tag = t && t.tagName ? t.tagName.toUpperCase() : "";
    return tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || (t && t.isContentEditable);
  }

  function flips() {
    var grid = document.getElementById("flips");
    if (!grid) return;
    var cards = Array.prototype.slice.call(grid.querySelectorAll(".card"));
    var size = Math.max(1, parseInt(grid.getAttribute("data-page-size"), 10) || 100);
    var ctl = {
      kind: document.getElementById("f-kind"),
      truth: document.getElementById("f-true"),
      predA: document.getElementById("f-pred-a"),
      predB: document.getElementById("f-pred-b"),
      q: document.getElementById("f-search")
    };
    var status = document.getElementById("flips-status");
    var info = document.getElementById("pg-info");
    var prev = document.getElementById("pg-prev");
    var next = document.getElementById("pg-next");
    var page = 1;

    function matches(c) {
      var q = ctl.q.value.toLowerCase();
      if (ctl.kind.value && c.getAttribute("data-kind") !== ctl.kind.value) return false;
      if (ctl.truth.value && c.getAttribute("data-true") !== ctl.truth.value) return false;
      if (ctl.predA.value && c.getAttribute("data-pred-a") !== ctl.predA.value) return false;
      if (ctl.predB.value && c.getAttribute("data-pred-b") !== ctl.predB.value) return false;
      if (q && (c.getAttribute("data-path") || "").toLowerCase().indexOf(q) < 0) return false;
      return true;
    }

    function render() {
      var shown = cards.filter(matches);
      var pages = Math.max(1, Math.ceil(shown.length / size));
      page = Math.min(Math.max(1, page), pages);
      var from = (page - 1) * size, to = from + size;
      cards.forEach(function (c) { c.hidden = true; });
      shown.slice(from, to).forEach(function (c) { c.hidden = false; });
      grid.setAttribute("data-matches", String(shown.length));
      grid.setAttribute("data-page", String(page));
      status.textContent = shown.length + " of " + cards.length + " changed predictions";
      info.textContent = "page " + page + " of " + pages;
      prev.disabled = page <= 1;
      next.disabled = page >= pages;
    }

    [ctl.kind, ctl.truth, ctl.predA, ctl.predB].forEach(function (s) {
      s.addEventListener("change", function () { page = 1; render(); });
    });
    ctl.q.addEventListener("input", function () { page = 1; render(); });
    prev.addEventListener("click", function () { page -= 1; render(); });
    next.addEventListener("click", function () { page += 1; render(); });
    render();
  }

  function keys() {
    document.addEventListener("keydown", function (ev) {
      if (ev.defaultPrevented || ev.altKey || ev.ctrlKey || ev.metaKey || ev.shiftKey || typing(ev)) return;
      var rel = ev.key === "ArrowLeft" ? "prev" : ev.key === "ArrowRight" ? "next" : null;
      var link = rel && document.querySelector("a[rel=" + rel + "]");
      if (link) {
        ev.preventDefault();
        location.href = link.href;
      }
    });
  }

  var kind = document.body.getAttribute("data-page");
  if (kind === "compare-index") flips();
  else if (kind === "compare-image") keys();
})();
