// Package legacyapi is a small users API that knows nothing of batches: the
// kind of service caddy-batch is put in front of. The demo serves it behind
// Caddy, and the module's tests run against it.
package legacyapi

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"sync"
)

// User is one record of the API.
type User struct {
	ID      int    `json:"id"`
	Name    string `json:"name"`
	Email   string `json:"email,omitempty"`
	Balance int    `json:"balance"`
}

// API serves /users (GET list, POST create), /users?email=E (GET the user
// with that email, 404 if none) and /users/{id} (GET, PUT, PATCH, DELETE)
// from memory, plus /health.
type API struct {
	mu     sync.Mutex
	users  map[int]*User
	nextID int
}

// New returns an empty API.
func New() *API {
	return &API{users: map[int]*User{}, nextID: 1}
}

// Len returns how many users the API holds.
func (a *API) Len() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.users)
}

// Get returns a copy of user id, if there is one.
func (a *API) Get(id int) (User, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	u, ok := a.users[id]
	if !ok {
		return User{}, false
	}
	return *u, true
}

func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/health" {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
		return
	}
	rest, ok := strings.CutPrefix(r.URL.Path, "/users")
	switch {
	case !ok:
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "not found"})
	case rest == "" || rest == "/":
		a.collection(w, r)
	default:
		id, err := strconv.Atoi(strings.TrimPrefix(rest, "/"))
		if err != nil {
			writeJSON(w, http.StatusNotFound, map[string]string{"error": "no such user"})
			return
		}
		a.member(w, r, id)
	}
}

func (a *API) collection(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch r.Method {
	case http.MethodGet:
		if email := r.URL.Query().Get("email"); email != "" {
			for id := 1; id < a.nextID; id++ {
				if u, ok := a.users[id]; ok && u.Email == email {
					writeJSON(w, http.StatusOK, u)
					return
				}
			}
			writeJSON(w, http.StatusNotFound, map[string]string{"error": "no user with that email"})
			return
		}
		list := make([]*User, 0, len(a.users))
		for id := 1; id < a.nextID; id++ {
			if u, ok := a.users[id]; ok {
				list = append(list, u)
			}
		}
		writeJSON(w, http.StatusOK, map[string]any{"data": list})
	case http.MethodPost:
		var u User
		if err := json.NewDecoder(r.Body).Decode(&u); err != nil || u.Name == "" {
			writeJSON(w, http.StatusUnprocessableEntity, map[string]string{"error": "a user needs a name"})
			return
		}
		u.ID = a.nextID
		a.nextID++
		a.users[u.ID] = &u
		w.Header().Set("Location", "/users/"+strconv.Itoa(u.ID))
		writeJSON(w, http.StatusCreated, u)
	default:
		w.Header().Set("Allow", "GET, POST")
		writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": "method not allowed"})
	}
}

func (a *API) member(w http.ResponseWriter, r *http.Request, id int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	u, ok := a.users[id]
	if !ok {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "no such user"})
		return
	}
	switch r.Method {
	case http.MethodGet:
		writeJSON(w, http.StatusOK, u)
	case http.MethodPut, http.MethodPatch:
		next := *u
		if r.Method == http.MethodPut {
			next = User{ID: id}
		}
		if err := json.NewDecoder(r.Body).Decode(&next); err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "body must be a JSON user"})
			return
		}
		next.ID = id
		if next.Name == "" {
			writeJSON(w, http.StatusUnprocessableEntity, map[string]string{"error": "a user needs a name"})
			return
		}
		a.users[id] = &next
		writeJSON(w, http.StatusOK, next)
	case http.MethodDelete:
		delete(a.users, id)
		w.WriteHeader(http.StatusNoContent)
	default:
		w.Header().Set("Allow", "GET, PUT, PATCH, DELETE")
		writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": "method not allowed"})
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
