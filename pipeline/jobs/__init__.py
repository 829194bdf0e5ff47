"""Operations jobs: retraining with a champion/challenger promotion gate, model store commands."""
