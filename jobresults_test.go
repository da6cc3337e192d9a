package batch

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-batch/batch/internal/lagstore"
	"github.com/caddyserver/caddy/v2"
	"github.com/tidwall/gjson"
)

// failingOps makes n operations of which every k-th (k-1, 2k-1, …) the
// backend answers 500 every time, the others after d.
func failingOps(n, k int, d string) (ops []string, failing []int) {
	for i := range n {
		path := fmt.Sprintf("/slow?id=%d&d=%s", i, d)
		if i%k == k-1 {
			path = fmt.Sprintf("/limited?id=f%d&n=1000000&status=500", i)
			failing = append(failing, i)
		}
		ops = append(ops, fmt.Sprintf(`{"id":"o%d","path":%q}`, i, path))
	}
	return ops, failing
}

// ndjsonLines reads an NDJSON answer: its result lines and its summary.
func ndjsonLines(t *testing.T, body string) (lines []gjson.Result, summary gjson.Result) {
	t.Helper()
	for l := range strings.SplitSeq(strings.TrimSpace(body), "\n") {
		v := mustJSON(t, l)
		if v.Get("summary").Bool() {
			summary = v
			continue
		}
		lines = append(lines, v)
	}
	return lines, summary
}

func indexes(rs []gjson.Result) []int {
	var out []int
	for _, r := range rs {
		out = append(out, int(r.Get("index").Int()))
	}
	return out
}

// A job's results are read while it runs: those final so far, in order,
// a failure among them within a second of the API answering it, and a
// follower is told when the job ends.
func TestResultsWhileJobRuns(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	ops, failing := failingOps(16, 6, "100ms")
	// The operation after a failure takes long: the failure is read
	// before it ends, not with the result after it.
	for _, i := range failing {
		ops[i+1] = fmt.Sprintf(`{"id":"o%d","path":"/slow?id=%d&d=1500ms"}`, i+1, i+1)
	}
	id := submitJob(t, base+"/batch", `{"mode":"sequential","batch":[`+strings.Join(ops, ",")+`]}`)
	job := base + "/batch/" + id

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", job+"/results?follow=true&outcome=failed", nil)
	req.Header.Set("Authorization", "Bearer alice")
	req.Header.Set("Accept", "application/x-ndjson")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/x-ndjson" {
		t.Fatalf("follow: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var got []int
	var summary gjson.Result
	var firstSeen time.Time
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		seen := time.Now()
		line := gjson.Parse(sc.Text())
		if line.Get("summary").Bool() {
			summary = line
			break
		}
		i := int(line.Get("index").Int())
		got = append(got, i)
		if firstSeen.IsZero() {
			firstSeen = seen
		}
		if line.Get("status").Int() != 500 || line.Get("id").String() != fmt.Sprintf("o%d", i) {
			t.Errorf("followed failure: %s", line.Raw)
		}
		for _, r := range be.requests() {
			if strings.HasPrefix(r.Path, fmt.Sprintf("/limited?id=f%d&", i)) {
				if lag := seen.Sub(r.At); lag > time.Second {
					t.Errorf("failure %d read %v after the API answered it", i, lag)
				}
			}
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("reading the followed results: %v", err)
	}
	if !slices.Equal(got, failing) {
		t.Errorf("followed failures %v, want %v", got, failing)
	}
	if !summary.Get("complete").Bool() || summary.Get("next").Exists() || summary.Get("failed").Int() != int64(len(failing)) ||
		summary.Get("status").String() != "completed_with_errors" {
		t.Errorf("summary of a followed job: %s", summary.Raw)
	}
	reqs := be.requests()
	if last := reqs[len(reqs)-1].At; !firstSeen.Before(last) {
		t.Errorf("the first failure was read at %v, after the last operation was sent (%v)", firstSeen, last)
	}
}

// While a job runs, a page holds the results final so far, says it is
// not complete and where to ask next; paged by next, the results are all
// there once, in order.
func TestResultsPagedWhileJobRuns(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	ops, _ := failingOps(12, 4, "150ms")
	job := base + "/batch/" + submitJob(t, base+"/batch", `{"mode":"sequential","batch":[`+strings.Join(ops, ",")+`]}`)
	var mid gjson.Result
	eventually(t, 20*time.Second, "a page with some results of a running job", func() bool {
		_, _, body := send(t, "GET", job+"/results", "", alice)
		mid = mustJSON(t, body)
		return mid.Get("results.#").Int() > 0
	})
	n := mid.Get("results.#").Int()
	if mid.Get("complete").Bool() || mid.Get("next").Int() != n || mid.Get("status").String() != "running" {
		t.Errorf("a page of a running job: %s", mid.Raw)
	}
	var all []string
	offset := 0
	eventually(t, 30*time.Second, "every result paged by next", func() bool {
		status, _, body := send(t, "GET", fmt.Sprintf("%s/results?offset=%d&limit=5", job, offset), "", alice)
		page := mustJSON(t, body)
		if status != 200 {
			t.Fatalf("page: %d %s", status, body)
		}
		for _, r := range page.Get("results").Array() {
			all = append(all, r.Get("id").String())
		}
		if !page.Get("next").Exists() {
			return page.Get("complete").Bool()
		}
		offset = int(page.Get("next").Int())
		return false
	})
	for i, id := range all {
		if id != fmt.Sprintf("o%d", i) {
			t.Fatalf("results paged by next: %v", all)
		}
	}
	if len(all) != 12 {
		t.Errorf("%d results paged, want 12", len(all))
	}
}

// Filters read only what they ask for, each result with its index, and
// the requests of failures as submitted, without inherited credentials;
// what a filter cannot serve, or does not know, is a 400 that says so.
func TestResultsFiltered(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	batch := `{"batch":[
		{"id":"ok","path":"/slow?d=0s"},
		{"id":"bad","method":"POST","path":"/limited?id=x&n=9&status=500","headers":{"X-Trace":"t1"},"body":{"name":"Ann"}},
		{"id":"after","path":"/slow?d=0s","depends_on":["bad"]},
		{"id":"fix","path":"/slow?d=0s","if":"failed(bad)"},
		{"id":"never","path":"/slow?d=0s","if":"succeeded(bad)"},
		{"id":"ok2","path":"/slow?d=0s"}]}`
	job := base + "/batch/" + submitJob(t, base+"/batch", batch)
	waitJob(t, job, alice, "completed")

	get := func(query string, headers ...string) (int, string) {
		status, _, body := send(t, "GET", job+"/results"+query, "", append([]string{alice}, headers...)...)
		return status, body
	}
	for _, c := range []struct {
		query string
		want  []int
	}{
		{"?outcome=failed", []int{1}},
		{"?outcome=skipped", []int{2, 4}},
		{"?outcome=failed,skipped", []int{1, 2, 4}},
		{"?outcome=failed&outcome=skipped", []int{1, 2, 4}},
		{"?outcome=succeeded", []int{0, 3, 5}},
		{"?outcome=succeeded,failed,skipped&offset=2", []int{2, 3, 4, 5}},
		{"?outcome=skipped&offset=3", []int{4}},
	} {
		status, body := get(c.query)
		res := mustJSON(t, body)
		if got := indexes(res.Get("results").Array()); status != 200 || !slices.Equal(got, c.want) {
			t.Errorf("%s: %d, indexes %v, want %v: %s", c.query, status, got, c.want, body)
		}
		if !res.Get("complete").Bool() || res.Get("next").Exists() {
			t.Errorf("%s: an ended job's last page: %s", c.query, body)
		}
		_, lines := get(c.query, "Accept: application/x-ndjson")
		rs, sum := ndjsonLines(t, lines)
		if got := indexes(rs); !slices.Equal(got, c.want) || !sum.Get("complete").Bool() {
			t.Errorf("%s as NDJSON: indexes %v, want %v: %s", c.query, got, c.want, lines)
		}
	}
	_, body := get("?outcome=failed,skipped&include=request")
	res := mustJSON(t, body).Get("results")
	bad := res.Get("0")
	if bad.Get("id").String() != "bad" || bad.Get("status").Int() != 500 || bad.Get("request.method").String() != "POST" ||
		bad.Get("request.path").String() != "/limited?id=x&n=9&status=500" || bad.Get("request.headers.X-Trace").String() != "t1" ||
		bad.Get("request.body.name").String() != "Ann" || bad.Get("request.headers.Authorization").Exists() {
		t.Errorf("a failure with its request: %s", bad.Raw)
	}
	if res.Get("1.request.depends_on.0").String() != "bad" || res.Get("2.request.if").String() != "succeeded(bad)" {
		t.Errorf("skipped operations with their requests: %s", res.Raw)
	}
	if res.Get("1.error").String() == "" || res.Get("2.status").Int() != 412 {
		t.Errorf("skipped results: %s", res.Raw)
	}

	// Paged one at a time by next, a filtered view is the same, in order.
	var paged []int
	for offset, pages := 0, 0; ; pages++ {
		_, body := get(fmt.Sprintf("?outcome=failed,skipped&limit=1&offset=%d", offset))
		page := mustJSON(t, body)
		paged = append(paged, indexes(page.Get("results").Array())...)
		if !page.Get("next").Exists() || pages > 10 {
			break
		}
		offset = int(page.Get("next").Int())
	}
	if !slices.Equal(paged, []int{1, 2, 4}) {
		t.Errorf("filtered results paged by next: %v", paged)
	}

	for query, want := range map[string]string{
		"?outcome=bogus":                     `unknown outcome "bogus"`,
		"?outcome=":                          `unknown outcome ""`,
		"?include=request":                   "include=request serves failed and skipped",
		"?include=request&outcome=succeeded": "include=request serves failed and skipped",
		"?include=headers&outcome=failed":    `unknown include "headers"`,
		"?follow=true":                       "follow streams NDJSON",
		"?offset=-1":                         "offset must be",
		"?limit=0":                           "limit must be",
	} {
		if status, body := get(query); status != 400 || !strings.Contains(mustJSON(t, body).Get("error").String(), want) {
			t.Errorf("%s: %d %s, want 400 saying %q", query, status, body, want)
		}
	}
	for _, query := range []string{"?outcome=failed", "?outcome=failed&include=request", "?follow=true"} {
		if status, _, body := send(t, "GET", job+"/results"+query, "", "Authorization: Bearer mallory", "Accept: application/x-ndjson"); status != 404 {
			t.Errorf("another owner's %s: %d %s", query, status, body)
		}
	}
}

// A job submitted as a JSON batch or multipart is answered in its format,
// filtered too: the format says each result's index and what follows the
// page as it can.
func TestResultsFilteredInEveryFormat(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	jsonBatch := `{"requests":[
		{"id":"1","method":"GET","url":"/slow?d=0s"},
		{"id":"2","method":"GET","url":"/limited?id=j2&n=9&status=500"},
		{"id":"3","method":"GET","url":"/slow?d=0s"},
		{"id":"4","method":"GET","url":"/limited?id=j4&n=9&status=500"}]}`
	job := base + "/batch/" + submitJob(t, base+"/batch", jsonBatch)
	waitJob(t, job, alice, "completed")
	_, _, body := send(t, "GET", job+"/results?outcome=failed&limit=1", "", alice)
	page := mustJSON(t, body)
	if page.Get("responses.#").Int() != 1 || page.Get("responses.0.id").String() != "2" || page.Get("responses.0.index").Int() != 1 ||
		!page.Get("complete").Bool() || page.Get("next").Int() != 2 ||
		!strings.Contains(page.Get(`@odata\.nextLink`).String(), "offset=2") {
		t.Errorf("a filtered page of a JSON batch job: %s", body)
	}
	next, _ := url.Parse(page.Get(`@odata\.nextLink`).String())
	_, _, body = send(t, "GET", base+next.String(), "", alice)
	page = mustJSON(t, body)
	if page.Get("responses.0.id").String() != "4" || page.Get("responses.0.index").Int() != 3 || page.Get("next").Exists() ||
		page.Get(`@odata\.nextLink`).Exists() {
		t.Errorf("the next link of a JSON batch job's page: %s", body)
	}

	mp := "--b\r\nContent-Type: application/http\r\nContent-ID: 1\r\n\r\nGET /slow?d=0s HTTP/1.1\r\n\r\n" +
		"--b\r\nContent-Type: application/http\r\nContent-ID: 2\r\n\r\nGET /limited?id=m2&n=9&status=500 HTTP/1.1\r\n\r\n" +
		"--b\r\nContent-Type: application/http\r\nContent-ID: 3\r\n\r\nGET /limited?id=m3&n=9&status=500 HTTP/1.1\r\n\r\n--b--\r\n"
	status, _, resp := send(t, "POST", base+"/batch", mp, alice, "Prefer: respond-async", "Content-Type: multipart/mixed; boundary=b")
	if status != 202 {
		t.Fatalf("multipart job: %d %s", status, resp)
	}
	job = base + "/batch/" + mustJSON(t, resp).Get("id").String()
	waitJob(t, job, alice, "completed")
	status, hdr, body := send(t, "GET", job+"/results?outcome=failed&limit=1", "", alice)
	if status != 200 || hdr.Get("Batch-Complete") != "true" || hdr.Get("Batch-Next") != "2" ||
		!strings.Contains(hdr.Get("Link"), `offset=2`) || !strings.Contains(hdr.Get("Link"), `rel="next"`) {
		t.Errorf("a filtered multipart page: %d %v", status, hdr)
	}
	_, params, err := mime.ParseMediaType(hdr.Get("Content-Type"))
	if err != nil {
		t.Fatalf("multipart page Content-Type %q: %v", hdr.Get("Content-Type"), err)
	}
	mr := multipart.NewReader(strings.NewReader(body), params["boundary"])
	var parts []string
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("multipart page: %v\n%s", err, body)
		}
		b, _ := io.ReadAll(p)
		parts = append(parts, p.Header.Get("Batch-Index")+" "+p.Header.Get("Content-ID")+" "+strings.SplitN(string(b), "\r\n", 2)[0])
	}
	if !slices.Equal(parts, []string{"1 2 HTTP/1.1 500 Internal Server Error"}) {
		t.Errorf("parts of a filtered multipart page: %q", parts)
	}
	status, hdr, _ = send(t, "GET", job+"/results?outcome=failed&offset=2", "", alice)
	if status != 200 || hdr.Get("Batch-Complete") != "true" || hdr.Get("Link") != "" || hdr.Get("Batch-Next") != "" {
		t.Errorf("the last filtered multipart page: %d %v", status, hdr)
	}
	if status, _, body := send(t, "GET", job+"/results?outcome=failed&include=request", "", alice); status != 400 {
		t.Errorf("include=request in multipart: %d %s", status, body)
	}
}

// Reading the failures of a large job reads the parts they are in, not
// every part of results: its storage reads grow with the failures and the
// parts, not with the job.
func TestFailuresReadCostsWhatTheyAre(t *testing.T) {
	n := 100_000 // 32 s here without the race detector
	if testing.Short() || underRace {
		n = 10_000
	}
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		max_ops 10000
		mode parallel
		concurrency 16
		async {
			retention 1h
		}
	}`), onLaggedStorage("0s"))
	var items strings.Builder
	failing := 0
	for i := range n {
		if i > 0 {
			items.WriteByte(',')
		}
		p := "health"
		if i%50 == 7 { // 2% fail
			p, failing = "nope", failing+1
		}
		fmt.Fprintf(&items, `{"p":%q}`, p)
	}
	id := submitJob(t, base+"/batch", `{"operation":{"method":"GET","path":"/{{item.p}}"},"items":[`+items.String()+`]}`)
	job := base + "/batch/" + id
	deadline := 5 * time.Minute
	p := waitJobFor(t, deadline, job, alice, "completed")
	if p.Get("failed").Int() != int64(failing) {
		t.Fatalf("job: %s, want %d failed", p.Raw, failing)
	}

	read := func(query string) (loads int64, lines []gjson.Result) {
		before := lagstore.Calls()
		_, _, body := send(t, "GET", job+"/results"+query, "", alice, "Accept: application/x-ndjson")
		loads = lagstore.Calls().Sub(before).Load
		lines, _ = ndjsonLines(t, body)
		return loads, lines
	}
	failLoads, failed := read("?outcome=failed")
	allLoads, all := read("")
	if len(failed) != failing || len(all) != n {
		t.Fatalf("read %d failures of %d, %d results of %d", len(failed), failing, len(all), n)
	}
	failParts := (failing + failuresPerPart - 1) / failuresPerPart
	t.Logf("%d operations, %d failed: the failures read with %d storage loads (%d parts of failures), every result with %d",
		n, failing, failLoads, failParts, allLoads)
	if failLoads > int64(failParts)+2 {
		t.Errorf("reading %d failures took %d loads, want at most %d parts + 2", failing, failLoads, failParts)
	}
	if allLoads < int64(n/resultsPerChunk) {
		t.Errorf("every result read with %d loads: fewer than its %d chunks, so the comparison proves nothing", allLoads, n/resultsPerChunk)
	}
	// A page from far in: the parts before it are passed over.
	before := lagstore.Calls()
	_, _, body := send(t, "GET", fmt.Sprintf("%s/results?outcome=failed&offset=%d&limit=3", job, n-200), "", alice)
	if loads := lagstore.Calls().Sub(before).Load; loads > 2 {
		t.Errorf("a page of failures from offset %d took %d loads", n-200, loads)
	}
	if got := indexes(mustJSON(t, body).Get("results").Array()); len(got) != 3 || got[0] < n-200 {
		t.Errorf("failures from offset %d: %v", n-200, got)
	}
}

// The failures of a job that resumes after a restart are each stored
// once, where the job left them.
func TestFailuresAcrossRestart(t *testing.T) {
	be := newBackend(t)
	base, restart := restartableCaddy(t, be)
	ops, failing := failingOps(30, 4, "30ms")
	id := submitJob(t, base+"/batch", "["+strings.Join(ops, ",")+"]")
	eventually(t, 10*time.Second, "a few operations run", func() bool { return len(be.requests()) >= 10 })
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	stoppedAt := len(be.requests())
	base = restart()
	waitJob(t, base+"/batch/"+id, alice, "completed")
	if stoppedAt >= len(be.requests()) {
		t.Fatalf("the restart did not fall mid-job")
	}
	_, _, body := send(t, "GET", base+"/batch/"+id+"/results?outcome=failed&include=request", "", alice)
	res := mustJSON(t, body).Get("results").Array()
	if got := indexes(res); !slices.Equal(got, failing) {
		t.Errorf("failures across a restart: %v, want %v", got, failing)
	}
	for _, r := range res {
		if !strings.HasPrefix(r.Get("request.path").String(), "/limited?id=f") {
			t.Errorf("a failure's request across a restart: %s", r.Raw)
		}
	}
}

// A follower waiting for the next result reads nothing from storage while
// none comes: it read back the part it had read, and the last part of
// failures, at every poll (ten a second).
func TestFollowerWaitingReadsNothing(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		async {
			retention 1h
		}
	}`), onLaggedStorage("0s"))
	t.Cleanup(be.release)
	id := submitJob(t, base+"/batch", `[{"path":"/nope"},{"path":"/hold?id=hold1"}]`)
	eventually(t, 10*time.Second, "the first result stored and the second held", func() bool {
		_, _, body := send(t, "GET", base+"/batch/"+id+"/results", "", alice)
		return holding(be) == 1 && mustJSON(t, body).Get("results.#").Int() == 1
	})
	for _, query := range []string{"?follow=true&offset=1", "?follow=true&offset=1&outcome=failed"} {
		ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
		req, _ := http.NewRequestWithContext(ctx, "GET", base+"/batch/"+id+"/results"+query, nil)
		req.Header.Set("Authorization", "Bearer alice")
		req.Header.Set("Accept", "application/x-ndjson")
		before := lagstore.Calls()
		if resp, err := http.DefaultClient.Do(req); err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		cancel()
		if loads := lagstore.Calls().Sub(before).Load; loads > 2 {
			t.Errorf("%s: a follower waiting 1.5 s for the next result made %d storage loads", query, loads)
		}
	}
}
